"""Best-fit packing of a global batch (``training/rows.next_rows``), through the validation list
(``batches_from_list``) and the training stream (``BatchSource.next_rows``).

Datasets are real indexed datasets (``tests/workers/trainer_common.write_dataset``); a conversation of ``n``
tokens takes ``n - 1`` positions. Expected rows of the hand-worked cases are written out from the rule
(least free space that still holds the conversation, ties to the lowest row; stop at the first conversation
no row holds); the invariants are checked against the stream drawn one item at a time from a fresh sampler.
"""
import collections

import numpy as np
import pytest

from megatron_qwen.batching.dataset import ConversationDataset
from megatron_qwen.batching.rows import batches_from_list
from megatron_qwen.batching.source import HELD_OUT
from workers import trainer_common
from workers.trainer_common import batch_source

SHA = "ab" * 32


def dataset_of_positions(path, positions, seq_length):
    """A dataset whose conversation ``i`` takes ``positions[i]`` positions."""
    conversations = [([7] * (count + 1), [1] * (count + 1)) for count in positions]
    return trainer_common.write_dataset(path, conversations, SHA, seq_length)


def packed(positions, count, tmp_path, seq_length=10, mode="pack", row_multiple=1):
    """The global batches (``count`` rows, or conversations in padfree mode) over conversations 0, 1, ... in list
    order, as conversation ids."""
    prefix = dataset_of_positions(tmp_path / "hand", positions, seq_length)
    items = [(0, index) for index in range(len(positions))]
    batches = batches_from_list(mode, items, count, [ConversationDataset(prefix)], seq_length, row_multiple)
    return [[tuple(conversation for _, conversation in row) for row in batch] for batch in batches]


def test_best_fit_differs_from_greedy_stream_order(tmp_path):
    # Rows of 10 positions, 2 rows per global batch; conversation i takes positions[i].
    # Greedy in stream order: row 0 = (0) [6; 1 does not fit], row 1 = (1, 2) [5 + 4; 3 does not fit]: 15/20.
    # Best fit, free space (row 0, row 1) after each step:
    #   0 (6): both rows hold it, tie -> row 0            (4, 10)
    #   1 (5): only row 1 holds it                         (4, 5)
    #   2 (4): rows 0 (4) and 1 (5) hold it; least -> 0    (0, 5)
    #   3 (3): only row 1                                  (0, 2)
    #   4 (1): only row 1                                  (0, 1)
    #   5 (5): no row holds it -> the batch ends; 5 opens the next one, whose second row stays empty.
    assert packed([6, 5, 4, 3, 1, 5], 2, tmp_path) == [[(0, 2), (1, 3, 4)], [(5,), ()]]


def test_ties_go_to_the_lowest_row_and_rows_keep_insertion_order(tmp_path):
    # 3 rows of 10. Free space (r0, r1, r2):
    #   0 (6) -> r0 (4, 10, 10); 1 (6) -> r1, tie with r2 (4, 4, 10); 2 (3) -> r0, tie with r1 (1, 4, 10);
    #   3 (9) -> r2 (1, 4, 1); 4 (2) -> r1, the only one (1, 2, 1); 5 (3) fits nowhere: next batch.
    # Greedy would give (0), (1, 2), (3) and start the next batch at 4.
    assert packed([6, 6, 3, 9, 2, 3], 3, tmp_path) == [[(0, 2), (1, 4), (3,)], [(5,), (), ()]]


def test_pad_mode_puts_one_conversation_per_row_in_stream_order(tmp_path):
    assert packed([6, 5, 4, 3, 1], 2, tmp_path, mode="pad") == [[(0,), (1,)], [(2,), (3,)], [(4,), ()]]


@pytest.mark.parametrize("row_multiple,padding", [(1, []), (2, []), (3, [()])])
def test_padfree_packs_a_fixed_number_of_conversations_longest_first(tmp_path, row_multiple, padding):
    # 4 conversations per global batch, rows of 10. Batch 1 takes 0..3 (6, 5, 4, 3), longest first:
    #   0 (6): no row yet -> new r0 (4); 1 (5): r0 lacks room -> new r1 (4, 5);
    #   2 (4): r0 (4) and r1 (5) hold it, least -> r0 (0, 5); 3 (3): r1 (0, 2).
    # Batch 2 takes the rest, 4 (1) and 5 (5), longest first: 5 -> new r0 (5); 4 -> r0 (4).
    # Rows are then added, empty, up to a multiple of row_multiple.
    found = packed([6, 5, 4, 3, 1, 5], 4, tmp_path, mode="padfree", row_multiple=row_multiple)
    expected = [[(0, 2), (1, 3)], [(5, 4)]]
    expected = [rows + [()] * (-len(rows) % row_multiple) for rows in expected]
    assert found == expected
    assert found[0][2:] == padding


@pytest.fixture(scope="module")
def random_lengths(tmp_path_factory):
    """400 conversations of 1 to 64 positions in rows of 64: one epoch outlasts the batches drawn below."""
    positions = np.random.default_rng(0).integers(1, 65, size=400).tolist()
    prefix = dataset_of_positions(tmp_path_factory.mktemp("random") / "lengths", positions, 64)
    return prefix, positions


def drawn_stream(prefix, count, seed):
    sampler = batch_source([prefix], rows="pad", seq_length=64, seed=seed).sampler
    return [sampler.take()[1] for _ in range(count)]


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_each_global_batch_is_a_stream_prefix_that_stops_at_the_first_misfit(random_lengths, mode):
    prefix, positions = random_lengths
    samples = batch_source([prefix], rows=mode, seq_length=64, seed=5)
    rng = np.random.default_rng(1)
    batches = [samples.next_rows(int(rng.integers(1, 9))) for _ in range(25)]
    order = drawn_stream(prefix, samples.sampler.drawn[0] + 1, seed=5)
    assert len(set(order)) == len(order)  # within one epoch: a stream position is known by its conversation
    where = {conversation: index for index, conversation in enumerate(order)}
    start = 0
    for rows in batches:
        placed = [conversation for row in rows for _, conversation in row]
        assert sorted(where[c] for c in placed) == list(range(start, start + len(placed)))  # the next prefix
        start += len(placed)
        for row in rows:
            assert row, "a training row is never empty"
            used = sum(positions[c] for _, c in row)
            assert used <= 64
            assert [where[c] for _, c in row] == sorted(where[c] for _, c in row)  # insertion order kept
        if mode == "pad":
            assert all(len(row) == 1 for row in rows)  # and, with the prefix check, in stream order
            assert [where[row[0][1]] for row in rows] == list(range(start - len(rows), start))
        else:  # the stopping rule: the next conversation of the stream fits in no row of the batch
            free = [64 - sum(positions[c] for _, c in row) for row in rows]
            assert positions[order[start]] > max(free)
    assert start == samples.sampler.drawn[0]


def test_padfree_takes_the_conversations_of_pad_mode_in_fewer_rows(random_lengths):
    prefix, positions = random_lengths
    pad = batch_source([prefix], rows="pad", seq_length=64, seed=5)
    padfree = batch_source([prefix], rows="padfree", seq_length=64, seed=5)
    for count in (8, 3, 16, 5):
        padded = pad.next_rows(count)
        rows = padfree.next_rows(count, row_multiple=4)
        conversations = lambda batch: sorted(c for row in batch for _, c in row)  # noqa: E731
        assert conversations(rows) == conversations(padded)
        assert len(rows) % 4 == 0
        assert all(sum(positions[c] for _, c in row) <= 64 for row in rows)
        # no fewer rows would do: after rounding up to the multiple, at most one row's worth of slack remains
        used = sum(positions[c] for c in conversations(rows))
        assert len([row for row in rows if row]) <= -(-used // 64) + 1
        assert padfree.counts(rows) == {**pad.counts(padded), "rows": len(rows)}
    assert padfree.state_dict()["drawn"] == pad.state_dict()["drawn"]  # the same data position


def test_best_fit_fills_rows_better_than_one_row_at_a_time(random_lengths):
    # One row per batch is greedy stream-order packing; 16 rows at once must leave clearly less padding
    # (on these uniform lengths: 78% against 87% of the positions filled).
    prefix, positions = random_lengths
    fill = {}
    for rows, batches in ((1, 128), (16, 8)):
        samples = batch_source([prefix], rows="pack", seq_length=64, seed=5)
        used = sum(positions[c] for _ in range(batches) for row in samples.next_rows(rows) for _, c in row)
        fill[rows] = used / (128 * 64)
    assert fill[16] > fill[1] + 0.05


def test_validation_batches_hold_every_conversation_once(random_lengths):
    prefix, positions = random_lengths
    samples = batch_source([prefix], valid_fraction=0.25, rows="pack", seq_length=64, seed=5, global_batch_size=8)
    batches = samples.validation_rows()[HELD_OUT]
    valid = [conversation for _, conversation in samples.valid_items]
    assert len(valid) == 100 and len(batches) > 1
    assert all(len(rows) == 8 for rows in batches)
    found = [conversation for rows in batches for row in rows for _, conversation in row]
    assert collections.Counter(found) == collections.Counter(valid)
    # empty rows only at the end of the last batch
    last = batches[-1]
    assert [bool(row) for row in last] == sorted((bool(row) for row in last), reverse=True)
    # consecutive batches take consecutive stretches of the validation list, each stopped by the rule
    start = 0
    for rows in batches:
        placed = sorted(valid.index(c) for row in rows for _, c in row)
        assert placed == list(range(start, start + len(placed)))
        start += len(placed)
        free = [64 - sum(positions[c] for _, c in row) for row in rows]
        assert min(free) >= 0
        if start < len(valid):
            assert all(rows) and positions[valid[start]] > max(free)
