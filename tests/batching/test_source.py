"""SFT samples: padding vs packing, boundaries, positions, shuffling, resume, blending, split, dataset checks.

Fixture datasets are written with megatron-core's IndexedDatasetBuilder (``tests/workers/trainer_common.py``),
the way the data tool writes them; expected values come from the raw token/mask lists written, by the definition
``input = tokens[:-1], labels = tokens[1:], loss_mask = mask[1:]`` per conversation.
"""
import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qwen.data.dataset_files import DatasetFilesError
from megatron_qwen.batching.checks import DatasetMismatchError
from megatron_qwen.batching.source import HELD_OUT
from workers import run_torchrun, trainer_common
from workers.trainer_common import batch_source

SEQ = 16
SHA = "ab" * 32


def write_dataset(prefix, conversations, seq_length=SEQ, sha=SHA):
    """conversations: list of (tokens, mask) lists."""
    return trainer_common.write_dataset(prefix, conversations, sha, seq_length)


def random_conversations(count, seed, base=0, min_len=3, max_len=SEQ, all_supervised=False):
    rng = np.random.default_rng(seed)
    conversations = []
    for index in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        # A marker first token makes each conversation identifiable: base + 1000 + index.
        tokens = [base + 1000 + index] + rng.integers(1, 900, size=length - 1).tolist()
        mask = [1] * length if all_supervised else rng.integers(0, 2, size=length).tolist()
        conversations.append((tokens, mask))
    return conversations


def expected_triples(conversations):
    return collections.Counter(
        (tuple(tokens[:-1]), tuple(tokens[1:]), tuple(float(m) for m in mask[1:])) for tokens, mask in conversations
    )


def first_epoch(samples):
    """Updates until the first epoch is drawn: (per-conversation triples in row order, padding masks,
    micro-batches seen, the stream items drawn). The last update may reach into the next epoch."""
    triples, padding, batches = [], [], []
    while samples.sampler.drawn[0] < len(samples.train_ids[0]):
        for batch in samples.next_update().micro_batches:
            found, padding_masks = triples_of(batch)
            triples += found
            padding += padding_masks
            batches.append(batch)
    return triples, padding, batches, samples.sampler.drawn[0]


def stream(prefix, seed, count):
    """The first ``count`` conversation ids of a run's sample stream, drawn one by one from a fresh sampler."""
    sampler = batch_source([prefix], rows="pad", seq_length=SEQ, seed=seed).sampler
    return [sampler.take()[1] for _ in range(count)]


def triples_of(batch, seq_length=SEQ):
    """Per-conversation (input, labels, mask) cut out of a micro-batch, plus the padding positions' masks."""
    found, padding_masks = [], []
    if batch.cu_seqlens is None:
        for row in range(batch.tokens.shape[0]):
            real = int(torch.count_nonzero(batch.tokens[row] != 151643))
            # pad mode: the conversation fills the front of the row.
            found.append(slice_triple(batch, row, 0, real))
            padding_masks.append(batch.loss_mask[row, real:])
        return found, padding_masks
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if int(batch.tokens[0, start]) == 151643:
            padding_masks.append(batch.loss_mask[0, start:end])
        else:
            found.append(slice_triple(batch, 0, start, end))
    return found, padding_masks


def slice_triple(batch, row, start, end):
    return (
        tuple(batch.tokens[row, start:end].tolist()),
        tuple(batch.labels[row, start:end].tolist()),
        tuple(batch.loss_mask[row, start:end].tolist()),
    )


@pytest.fixture
def dataset(tmp_path):
    conversations = random_conversations(40, seed=1)
    return write_dataset(tmp_path / "chat", conversations), conversations


@pytest.mark.parametrize("mode", ["pad", "pack", "padfree"])
@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_an_epoch_holds_every_conversation_once_with_shifted_labels_and_mask(dataset, mode, micro_batch_size):
    prefix, conversations = dataset
    samples = batch_source([prefix], rows=mode, seq_length=SEQ, seed=7, global_batch_size=4,
                           micro_batch_size=micro_batch_size, share=(0, 1, micro_batch_size))
    triples, padding, batches, drawn = first_epoch(samples)
    # The batches hold exactly the conversations drawn from the stream (a whole epoch and, packed, the start
    # of the next one), each once, with its own shifted labels and mask.
    drawn_ids = stream(prefix, 7, drawn)
    assert sorted(drawn_ids[: len(conversations)]) == list(range(len(conversations)))
    assert collections.Counter(triples) == expected_triples([conversations[c] for c in drawn_ids])
    assert all(float(mask.sum()) == 0 for mask in padding)
    for batch in batches:  # the supervised positions are exactly those of the conversations found
        assert batch.loss_mask.sum().item() == sum(sum(triple[2]) for triple in triples_of(batch)[0])
    # the host-side counts of a global batch (for the log) agree with its collated micro-batches
    update = samples.next_update()
    rows, micro_batches = update.rows, update.micro_batches
    assert update.counts == {
        "tokens": sum(len(triple[0]) for batch in micro_batches for triple in triples_of(batch)[0]),
        "conversations": sum(len(triples_of(batch)[0]) for batch in micro_batches),
        "rows": len(rows),
    }


def test_packing_and_padding_give_the_same_conversations(dataset):
    prefix, conversations = dataset
    by_mode = {}
    for mode in ("pad", "pack"):
        # one row per global batch: best-fit over a single row keeps the stream order
        triples, _, batches, _ = first_epoch(batch_source([prefix], rows=mode, seq_length=SEQ, seed=3))
        by_mode[mode] = (triples[: len(conversations)], len(batches))
    assert by_mode["pad"][0] == by_mode["pack"][0]  # same conversations, same order, same tokens/labels/masks
    assert by_mode["pack"][1] < by_mode["pad"][1] == len(conversations)  # packing put several in a row


def test_pack_boundaries_are_never_supervised_and_positions_restart(tmp_path):
    # Every token's mask is 1, so a first token wrongly shifted into the previous conversation would count.
    conversations = [([1000, 11, 12, 13], [1] * 4), ([1001, 21, 22], [1] * 3), ([1002, 31, 32, 33, 34], [1] * 5)]
    prefix = write_dataset(tmp_path / "b", conversations, seq_length=10)
    samples = batch_source([prefix], rows="pack", seq_length=10, seed=0)
    rows = samples.next_rows(1)
    assert len(rows[0]) == 3  # 3 + 2 + 4 = 9 positions fit one row of 10, the next epoch's first does not
    (batch,) = samples.rank_micro_batches(rows)
    order = [conversation for _, conversation in rows[0]]
    lengths = [len(conversations[c][0]) - 1 for c in order]
    assert batch.cu_seqlens.tolist() == [0, lengths[0], lengths[0] + lengths[1], 9, 10]
    assert batch.max_seqlen == 4
    expected_positions = [p for n in lengths for p in range(n)] + [0]
    assert batch.position_ids[0].tolist() == expected_positions
    expected_labels = [t for c in order for t in conversations[c][0][1:]]
    assert batch.labels[0, :9].tolist() == expected_labels
    assert not any(label >= 1000 for label in batch.labels[0, :9].tolist())  # no conversation's first token is a target
    assert batch.loss_mask.sum().item() == 9 == sum(len(conversations[c][0]) - 1 for c in order)
    assert batch.loss_mask[0, 9:].tolist() == [0.0]
    params = batch.packed_seq_params()
    assert params.qkv_format == "thd" and params.cu_seqlens_q is batch.cu_seqlens and params.max_seqlen_kv == 4


def test_pack_micro_batch_of_two_keeps_both_rows_boundaries(tmp_path):
    conversations = [([1000 + i] + [5] * 7, [1] * 8) for i in range(4)]  # 7 positions each: one per row of 10
    prefix = write_dataset(tmp_path / "c", conversations, seq_length=10)
    samples = batch_source([prefix], rows="pack", seq_length=10, seed=0, global_batch_size=2, micro_batch_size=2)
    rows = samples.next_rows(2)
    (batch,) = samples.rank_micro_batches(rows)
    assert batch.tokens.shape == (1, 20)
    assert batch.cu_seqlens.tolist() == [0, 7, 10, 17, 20]
    assert batch.position_ids[0].tolist() == list(range(7)) + [0, 1, 2] + list(range(7)) + [0, 1, 2]
    assert samples.counts(rows) == {"tokens": 14, "conversations": 2, "rows": 2} and batch.loss_mask.sum().item() == 14


def test_shuffling_is_deterministic_per_seed_and_differs_per_epoch(dataset):
    prefix, conversations = dataset
    n = len(conversations)

    def order(seed, rows):
        samples = batch_source([prefix], rows="pad", seq_length=SEQ, seed=seed)
        return [row[0][1] for row in samples.next_rows(rows)]

    first = order(5, 2 * n)
    assert first == order(5, 2 * n)
    assert first != order(6, 2 * n)
    epoch0, epoch1 = first[:n], first[n:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 != list(range(n))


@pytest.mark.parametrize("mode", ["pad", "padfree", "pack"])
@pytest.mark.parametrize("epochs", [0.5, 1, 2.3])
def test_a_run_of_n_epochs_is_the_fewest_updates_whose_draws_reach_them(tmp_path, mode, epochs):
    prefixes = [
        write_dataset(tmp_path / f"d{i}", random_conversations(size, seed=i, base=100 * i)) for i, size in enumerate([9, 21])
    ]
    samples = batch_source(prefixes, data_weights=[1, 2], valid_fraction=0.1, rows=mode, seq_length=SEQ, seed=5,
                           global_batch_size=4)
    assert [len(ids) for ids in samples.train_ids] == [8, 19]  # 1 and 2 held out
    updates = samples.updates_for_epochs(epochs)
    if mode != "pack":
        assert updates == -(-round(epochs * 27 * 10) // 40)  # ceil(epochs x 27 / 4 conversations per update)
    drawn = []
    for _ in range(updates):
        rows = samples.next_rows(4)
        drawn.append(sum(len(row) for row in rows))
    assert sum(drawn) >= epochs * 27 > sum(drawn[:-1])
    assert samples.epochs() == pytest.approx([d / t for d, t in zip(samples.sampler.drawn, [8, 19])])


# padfree: 6 conversations per update in rows rounded up to a multiple of 4 (2 ranks x 2-row micro-batches)
@pytest.mark.parametrize("mode,rows,multiple", [("pad", 4, 1), ("pack", 4, 1), ("pack", 8, 1), ("padfree", 6, 4)])
def test_resumed_data_position_reproduces_the_following_batches(dataset, mode, rows, multiple):
    prefix, _ = dataset
    uninterrupted = batch_source([prefix], rows=mode, seq_length=SEQ, seed=11)
    plans = [uninterrupted.next_rows(rows, multiple) for _ in range(30)]  # crosses several epochs
    first = batch_source([prefix], rows=mode, seq_length=SEQ, seed=11)
    for _ in range(13):
        first.next_rows(rows, multiple)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = batch_source([prefix], rows=mode, seq_length=SEQ, seed=11)
    resumed.load_state_dict(saved)
    for step in range(13, 30):
        batch_rows = resumed.next_rows(rows, multiple)
        assert batch_rows == plans[step]
    second_rank = batch_source([prefix], rows=mode, seq_length=SEQ, seed=11, micro_batch_size=2, share=(1, 2, 4))
    a = second_rank.rank_micro_batches(plans[29])[0]
    b = second_rank.rank_micro_batches(batch_rows)[0]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)


def test_a_padded_run_resumes_padfree_with_the_same_conversations(dataset):
    prefix, _ = dataset
    padded = batch_source([prefix], rows="pad", seq_length=SEQ, seed=11)
    for _ in range(5):
        padded.next_rows(4)
    padfree = batch_source([prefix], rows="padfree", seq_length=SEQ, seed=11)
    padfree.load_state_dict(json.loads(json.dumps(padded.state_dict())))
    for _ in range(5):
        expected = sorted(item for row in padded.next_rows(4) for item in row)
        assert sorted(item for row in padfree.next_rows(4, 2) for item in row) == expected


def test_resume_into_different_data_settings_is_refused(dataset):
    prefix, _ = dataset
    state = batch_source([prefix], rows="pad", seq_length=SEQ, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"data settings changed \(mode: saved 'pad', now 'pack'"):
        batch_source([prefix], rows="pack", seq_length=SEQ, seed=1).load_state_dict(state)


def test_blending_follows_the_weights(tmp_path):
    prefixes = [
        write_dataset(tmp_path / f"d{i}", random_conversations(size, seed=i, base=100 * i, max_len=6))
        for i, size in enumerate([7, 30, 11])
    ]
    samples = batch_source(prefixes, data_weights=[5, 3, 2], rows="pad", seq_length=SEQ, seed=0)
    drawn = collections.Counter()
    for draws in range(1, 501):
        drawn[samples.next_rows(1)[0][0][0]] += 1
        for dataset, weight in enumerate([0.5, 0.3, 0.2]):
            assert abs(drawn[dataset] - weight * draws) <= 1
    assert samples.epochs() == pytest.approx([250 / 7, 150 / 30, 100 / 11])
    # Default weights: by size, i.e. one epoch of every dataset per 48 draws.
    default = batch_source(prefixes, rows="pad", seq_length=SEQ, seed=0)
    firsts = collections.Counter(row[0][0] for row in default.next_rows(48))
    assert firsts == {0: 7, 1: 30, 2: 11}


def test_validation_split_is_disjoint_and_covered_once(dataset):
    prefix, conversations = dataset
    samples = batch_source([prefix], valid_fraction=0.1, rows="pack", seq_length=SEQ, seed=2, global_batch_size=3)
    valid = {conversation for _, conversation in samples.valid_items}
    assert len(valid) == 4
    assert set(samples.train_ids[0].tolist()) == set(range(40)) - valid
    trained = {c for _ in range(10) for row in samples.next_rows(8) for _, c in row}
    assert trained.isdisjoint(valid) and trained == set(range(40)) - valid
    batches = samples.validation_rows()[HELD_OUT]
    assert all(len(batch) == 3 for batch in batches)
    assert sorted(c for batch in batches for row in batch for _, c in row) == sorted(valid)
    # The seed does not move the validation set.
    padding_only = samples.collate([()])
    assert samples.counts([()]) == {"tokens": 0, "conversations": 0, "rows": 1}
    assert (padding_only.loss_mask.sum().item(), padding_only.cu_seqlens.tolist()) == (0, [0, SEQ])
    other_seed = batch_source([prefix], valid_fraction=0.1, rows="pad", seq_length=SEQ, seed=99)
    assert other_seed.valid_items == samples.valid_items


def test_validation_runs_on_a_fixed_uniform_sample_of_the_held_out_conversations(tmp_path):
    prefixes = [write_dataset(tmp_path / f"d{i}", random_conversations(size, seed=i, base=100 * i, max_len=6))
                for i, size in enumerate([300, 100])]
    every = batch_source(prefixes, valid_fraction=0.5, rows="pad", seq_length=SEQ, seed=0)
    assert len(every.valid_items) == 200
    sampled = batch_source(prefixes, valid_fraction=0.5, rows="pad", seq_length=SEQ, seed=7, eval_conversations=40)
    assert len(sampled.valid_items) == len(set(sampled.valid_items)) == 40
    assert set(sampled.valid_items) <= set(every.valid_items)
    assert sampled.valid_items == sorted(sampled.valid_items)  # in the held-out order, dataset by dataset
    # a uniform sample: both datasets in about their 150:50 share (hypergeometric, sd ~2.4), not the first 40
    from_first = sum(1 for dataset, _ in sampled.valid_items if dataset == 0)
    assert 20 <= from_first <= 38
    # the same sample whatever the run's seed, rows or batch size; validation covers each of it once
    again = batch_source(prefixes, valid_fraction=0.5, rows="padfree", seq_length=SEQ, seed=99, eval_conversations=40,
                         global_batch_size=16)
    assert again.valid_items == sampled.valid_items
    validation = again.validation_rows()  # one set per dataset
    covered = [item for batches in validation.values() for batch in batches for row in batch for item in row]
    assert sorted(covered) == sampled.valid_items
    # a limit above the held-out count keeps them all
    assert batch_source(prefixes, valid_fraction=0.5, rows="pad", seq_length=SEQ, eval_conversations=500).valid_items \
        == every.valid_items


def test_overlong_conversation_is_refused_by_name(tmp_path):
    prefix = write_dataset(tmp_path / "long", [([1] * 5, [1] * 5), ([2] * 12, [1] * 12)], seq_length=12)
    samples = batch_source([prefix], rows="pack", seq_length=10, seed=0)
    with pytest.raises(ValueError, match=r"long'.*conversation 1 has 12 tokens.*--seq-length 10"):
        for _ in range(3):
            samples.next_rows(1)


def test_dataset_checks_name_the_file(tmp_path):
    ok = write_dataset(tmp_path / "ok", random_conversations(5, seed=0))
    batch_source([ok], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=2000)
    with pytest.raises(DatasetMismatchError, match=rf"{ok}_stats.json: tokenized with a different tokenizer"):
        batch_source([ok], seq_length=SEQ, pad_token_id=0).check("cd" * 32, embedding_rows=2000)
    with pytest.raises(DatasetMismatchError, match=rf"{ok}_text_document.bin: token id 1004 has no row .*1004 rows"):
        batch_source([ok], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=1004)
    with pytest.raises(ValueError, match=r"pad_token_id 151643 has no row in the model's embedding \(2000 rows\)"):
        batch_source([ok], seq_length=SEQ).check(SHA, embedding_rows=2000)
    with pytest.raises(DatasetMismatchError, match=rf"{ok}_text_document.idx: conversation \d+ has \d+ tokens, more "
                                                   r"than a row of --seq-length 8 positions holds"):
        batch_source([ok], seq_length=8, pad_token_id=0).check(SHA, embedding_rows=2000)
    other = write_dataset(tmp_path / "other", random_conversations(5, seed=0), sha="ef" * 32)
    with pytest.raises(DatasetMismatchError, match=rf"{other}_stats.json: tokenizer sha256 {'ef' * 32} differs"):
        batch_source([ok, other], seq_length=SEQ, pad_token_id=0).check(None, embedding_rows=2000)
    grown = write_dataset(tmp_path / "grown", random_conversations(5, seed=0))
    with open(f"{grown}_text_document.bin", "ab") as data:
        data.write(b"\0" * 4)  # a file that changed after the stats were written
    with pytest.raises(DatasetFilesError, match=rf"{grown}_text_document.bin: \d+ bytes, but its index"):
        batch_source([grown], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=2000)
    stats = json.loads((tmp_path / "ok_stats.json").read_text())
    (tmp_path / "ok_stats.json").write_text(json.dumps({"provenance": {"seq_length": SEQ}, "files": stats["files"]}))
    with pytest.raises(DatasetMismatchError, match=rf"{ok}_stats.json: has no 'provenance.tokenizer.sha256'"):
        batch_source([ok], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=2000)
    (tmp_path / "ok_stats.json").write_text("{")
    with pytest.raises(DatasetFilesError, match=rf"{ok}_stats.json: unreadable"):
        batch_source([ok], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=2000)
    (tmp_path / "ok_stats.json").unlink()
    with pytest.raises(DatasetFilesError, match=rf"{ok}_stats.json: missing"):
        batch_source([ok], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows=2000)
    with pytest.raises(FileNotFoundError, match="nothere_text_document.bin/.idx not found"):
        batch_source([str(tmp_path / "nothere")])


@pytest.mark.parametrize("corrupt, message", [
    (lambda index: b"NOTANIDX!" + index[9:], "not a megatron-core index (bad magic)"),
    # the sequence count (bytes 18-26, after magic, version and dtype code) one too high, one too low; a cut file.
    # 5 conversations take 34 header bytes, 12 per sequence (length, pointer) and 8 per document (6 boundaries)
    (lambda index: index[:18] + (int.from_bytes(index[18:26], "little") + 1).to_bytes(8, "little") + index[26:],
     "its header counts 6 sequences and 6 documents, which take 154 bytes, but the file has 142"),
    (lambda index: index[:18] + (int.from_bytes(index[18:26], "little") - 1).to_bytes(8, "little") + index[26:],
     "its header counts 4 sequences and 6 documents, which take 130 bytes, but the file has 142"),
    (lambda index: index[:-8],
     "its header counts 5 sequences and 6 documents, which take 142 bytes, but the file has 134"),
])
def test_a_corrupt_index_is_named(tmp_path, corrupt, message):
    prefix = write_dataset(tmp_path / "d", random_conversations(5, seed=0))
    index = tmp_path / "d_loss_mask_document.idx"
    index.write_bytes(corrupt(index.read_bytes()))
    with pytest.raises(DatasetFilesError, match=rf"^{index}: {re.escape(message)}"):
        batch_source([prefix], seq_length=SEQ, pad_token_id=0)


def test_an_update_larger_than_the_training_set_is_refused(tmp_path):
    prefix = write_dataset(tmp_path / "d", random_conversations(10, seed=0))
    def check(global_batch_size):  # 8 of the 10 for training
        batch_source([prefix], valid_fraction=0.2, seq_length=SEQ, pad_token_id=0,
                     global_batch_size=global_batch_size).check(SHA, embedding_rows=2000)

    check(8)
    with pytest.raises(ValueError, match=r"--global-batch-size 9: one update would draw more than the 8 training"):
        check(9)


@pytest.mark.slow
def test_packed_and_padded_micro_batches_give_the_same_loss_through_the_model(tmp_path):
    rng = np.random.default_rng(4)
    conversations = []
    for _ in range(12):
        length = int(rng.integers(4, 20))
        conversations.append((rng.integers(0, 256, size=length).tolist(), rng.integers(0, 2, size=length).tolist()))
    prefix = write_dataset(tmp_path / "model", conversations, seq_length=32)
    out = tmp_path / "losses.json"
    run_torchrun("training_packed_model.py", 1, prefix, out, timeout=240)
    result = json.loads(out.read_text())
    # the same conversations; best-fit places them out of stream order, which the token-weighted loss ignores
    assert sorted(result["packed_conversations"]) == sorted(result["padded_conversations"])
    assert len(result["packed_conversations"]) > 4  # 4 packed rows really held several conversations each
    # Attention leaking across the packed conversations moved this loss by 6e-5 (relative) here; equal is 2e-7.
    assert result["packed"] == pytest.approx(result["padded"], rel=2e-6)


def test_chat_settings_come_from_each_datasets_provenance(tmp_path):
    # What the trainer records in chat.json for the exported chat template; older datasets name no policy.
    prefixes = []
    for name, provenance in (("a", {"system_prompt": "Be brief.", "reasoning_history": "split"}),
                             ("b", {"system_prompt": ""})):
        prefix = write_dataset(tmp_path / name, random_conversations(4, seed=0))
        stats_file = tmp_path / f"{name}_stats.json"
        stats = json.loads(stats_file.read_text())
        stats["provenance"].update(provenance)
        stats_file.write_text(json.dumps(stats))
        prefixes.append(prefix)
    samples = batch_source(prefixes, rows="pad", seq_length=SEQ, seed=0)
    assert samples.chat_settings() == {"system_prompts": ["Be brief.", ""], "reasoning_history": ["split", "keep"]}
    unrecorded = write_dataset(tmp_path / "c", random_conversations(4, seed=0))
    assert batch_source([prefixes[0], unrecorded], rows="pad", seq_length=SEQ, seed=0).chat_settings() is None


def test_validation_only_datasets_are_named_sets_outside_the_stream(tmp_path):
    train = write_dataset(tmp_path / "train", random_conversations(30, seed=1))
    written = {"eval_math": random_conversations(7, seed=2, base=100)}
    prefixes = [write_dataset(tmp_path / "eval_math", written["eval_math"])]
    for folder in ("a", "b"):  # two datasets both called chat
        (tmp_path / folder).mkdir()
        prefixes.append(write_dataset(tmp_path / folder / "chat", random_conversations(5, seed=3, base=200)))
        written[prefixes[-1]] = random_conversations(5, seed=3, base=200)
    samples = batch_source([train], valid_fraction=0.1, rows="pad", seq_length=SEQ, seed=4, valid_data_path=prefixes,
                           global_batch_size=4)
    assert list(samples.valid_sets) == [HELD_OUT, "eval_math", *prefixes[1:]]  # ambiguous names: the whole PREFIX
    batches = samples.validation_rows()
    for index, name in enumerate(written, start=1):
        covered = sorted(item for batch in batches[name] for row in batch for item in row)
        assert covered == [(index, conversation) for conversation in range(len(written[name]))]  # each once
        tokens, _ = written[name][2]
        assert samples.collate([((index, 2),)]).tokens[0, : len(tokens) - 1].tolist() == tokens[:-1]
    # never drawn for training: the stream and its fingerprint are those of a run without them
    alone = batch_source([train], valid_fraction=0.1, rows="pad", seq_length=SEQ, seed=4)
    assert [samples.next_rows(8) for _ in range(5)] == [alone.next_rows(8) for _ in range(5)]
    alone.load_state_dict(samples.state_dict())
    # --eval-conversations samples each set
    sampled = batch_source([train], valid_fraction=0.1, rows="pad", seq_length=SEQ, valid_data_path=prefixes[:1],
                         eval_conversations=3)
    assert [len(items) for items in sampled.valid_sets.values()] == [3, 3]
    assert set(sampled.valid_sets["eval_math"]) < set(samples.valid_sets["eval_math"])


def test_blended_datasets_hold_out_a_validation_set_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative PREFIXes
    for folder in ("held-out", "other"):
        Path(folder).mkdir()
    prefixes = [write_dataset(name, random_conversations(size, seed=size, base=100 * size))
                for name, size in (("chat", 30), ("code", 20), ("held-out/code", 5), ("other/code", 5))]
    samples = batch_source(prefixes[:2], valid_fraction=0.1, rows="pad", seq_length=SEQ, valid_data_path=prefixes[1:2])
    assert list(samples.held_out_sets) == ["held-out/chat", "held-out/code"]
    assert [len(items) for items in samples.held_out_sets.values()] == [3, 2]
    assert [item for items in samples.held_out_sets.values() for item in items] == samples.valid_items
    assert all(dataset == index for index, items in enumerate(samples.held_out_sets.values()) for dataset, _ in items)
    assert list(samples.valid_sets) == ["held-out/chat", "held-out/code", "code"]
    # two validation datasets called code are named by their PREFIXes, and one of those is a held-out part's name
    with pytest.raises(ValueError, match="--valid-data-path: a validation set is already called 'held-out/code'"):
        batch_source(prefixes[:2], valid_fraction=0.1, valid_data_path=prefixes[2:])


def test_validation_datasets_rendered_unlike_the_training_data_are_named(tmp_path):
    def dataset(name, **provenance):
        prefix = write_dataset(tmp_path / name, random_conversations(6, seed=1))
        stats_file = tmp_path / f"{name}_stats.json"
        stats = json.loads(stats_file.read_text())
        stats["provenance"].update(provenance)
        stats_file.write_text(json.dumps(stats))
        return prefix

    rendering = {"loss_mask": "assistant", "system_prompt": "You are a helpful assistant.", "reasoning_history": "keep"}
    train = [dataset("chat", **rendering), dataset("code", **{**rendering, "system_prompt": ""})]
    valid = [dataset("same", **rendering), dataset("like_code", **{**rendering, "system_prompt": ""}),
             dataset("other", **{**rendering, "loss_mask": "qwen-finetune", "reasoning_history": "split"}),
             dataset("unrecorded")]
    samples = batch_source(train, rows="pad", seq_length=SEQ, valid_data_path=valid)
    assert samples.rendering_warnings() == [
        "validation set other was rendered unlike the training data: loss_mask 'qwen-finetune' (training: "
        "'assistant'); reasoning_history 'split' (training: 'keep')"
    ]
