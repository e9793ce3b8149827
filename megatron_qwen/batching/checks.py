"""The pre-training check of each dataset against the run: ``PREFIX_stats.json`` provenance, the files' digests and
the values they hold.

A dataset tokenized with another tokenizer, holding ids the embedding has no row for (or negative ones), loss-mask
bytes other than 0 and 1, bytes changed since it was written, or built for longer rows than the run uses would
train silently on garbage; each case stops here with a message naming the file (a missing, unreadable or incomplete
one is named by ``data/dataset_files.read_stats``). The files are read once, in chunks shared out over the ranks
(each chunk checked against its recorded sha256, the token and mask chunks scanned for their smallest and largest
values), so the start-up cost is the datasets' size divided by the ranks. Also read from the stats: the default
system prompt each dataset was rendered with, which the trainer's checkpoints record for the exported chat
template, and how a validation-only dataset's rendering differs from the training data's.
"""
from __future__ import annotations

import numpy as np

from megatron_qwen.data.dataset_files import (DatasetFilesError, data_chunks, loss_mask_prefix, read_chunk, read_stats,
                                              stats_path, text_prefix, TEXT_SUFFIX)
from megatron_qwen.data.reasoning_history import DEFAULT_REASONING_HISTORY
from megatron_qwen.data.writer import TOKEN_DTYPE
from megatron_qwen.platform import distributed
from megatron_qwen.batching.dataset import ConversationDataset

# Where PREFIX_stats.json (written by tools/preprocess_chatml.py) keeps what this check reads: under
# "provenance", the tokenizer's provenance (ChatTokenizer.provenance()). The row length the dataset was cut for
# ("provenance", "seq_length") is not a reason to refuse it: its conversations' real lengths are in the index.
TOKENIZER_SHA256_KEY = ("provenance", "tokenizer", "sha256")


class DatasetMismatchError(ValueError):
    """A dataset does not fit the run it was given to."""


def stats_value(stats: dict, key: tuple[str, ...], path: str):
    value = stats
    for part in key:
        if not isinstance(value, dict) or part not in value:
            raise DatasetMismatchError(
                f"{path}: has no {'.'.join(key)!r}; rebuild the dataset with tools/preprocess_chatml.py"
            )
        value = value[part]
    return value


def check_dataset(
    dataset: ConversationDataset,
    tokenizer_sha256: str | None,
    embedding_rows: int,
    seq_length: int,
    values: dict[str, tuple[int, int]],
) -> str:
    """Raises ``DatasetMismatchError`` naming the stats or data file when ``dataset`` does not fit the run.

    ``tokenizer_sha256`` is the run's tokenizer (``None`` checks only that it is recorded); ``embedding_rows``
    the model's vocabulary rows; ``seq_length`` the run's row length, which the longest conversation must fit
    (whatever ``--seq-length`` the dataset was preprocessed with); ``values`` the smallest and largest value of
    each ``.bin`` (``scan``). Returns the recorded tokenizer sha256.
    """
    path = stats_path(dataset.prefix)
    stats = read_stats(dataset.prefix)
    recorded_sha = stats_value(stats, TOKENIZER_SHA256_KEY, path)
    if tokenizer_sha256 is not None and recorded_sha != tokenizer_sha256:
        raise DatasetMismatchError(
            f"{path}: tokenized with a different tokenizer (sha256 {recorded_sha}) than the run's "
            f"(sha256 {tokenizer_sha256}); re-run tools/preprocess_chatml.py with the model's tokenizer"
        )
    longest = int(dataset.lengths.argmax())
    if dataset.num_positions(longest) > seq_length:
        raise DatasetMismatchError(
            f"{text_prefix(dataset.prefix)}.idx: conversation {longest} has {dataset.lengths[longest]} tokens, more "
            f"than a row of --seq-length {seq_length} positions holds (rebuild with --seq-length {seq_length} or "
            "raise the run's)"
        )
    tokens, masks = f"{text_prefix(dataset.prefix)}.bin", f"{loss_mask_prefix(dataset.prefix)}.bin"
    min_id, max_id = values[tokens]
    if min_id < 0:
        raise DatasetMismatchError(f"{tokens}: negative token id {min_id}; the file is damaged, rebuild the dataset")
    if max_id >= embedding_rows:
        raise DatasetMismatchError(
            f"{tokens}: token id {max_id} has no row in the model's embedding "
            f"({embedding_rows} rows); the dataset was tokenized for another model"
        )
    if values[masks][1] > 1:
        raise DatasetMismatchError(f"{masks}: loss-mask byte {values[masks][1]} (only 0 and 1 are written); the "
                                   "file is damaged, rebuild the dataset")
    return recorded_sha


def scan(datasets: list[ConversationDataset]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Reads every dataset's files once, in chunks shared out over the ranks (a collective when torch.distributed
    is initialized): checks each chunk's recorded digest and returns the smallest and largest value of each
    ``.bin``, and a warning per dataset whose stats record no digests. Raises ``DatasetFilesError`` naming the file
    on every rank when any rank found a chunk that differs from its digest."""
    chunks, warnings = [], []
    for dataset in datasets:
        stats = read_stats(dataset.prefix)
        chunks += data_chunks(dataset.prefix, stats)
        if "digests" not in stats:
            warnings.append(f"{stats_path(dataset.prefix)}: records no digests (written before datasets recorded "
                            "them); its files cannot be verified")
    rank, world_size = distributed.rank_and_size()
    problem, values = None, {}
    try:
        for chunk in chunks[rank::world_size]:
            data = read_chunk(chunk)
            if chunk.path.suffix == ".bin" and chunk.size:
                array = np.frombuffer(data, TOKEN_DTYPE if chunk.path.name.endswith(f"{TEXT_SUFFIX}.bin") else np.uint8)
                _widen(values, str(chunk.path), (int(array.min()), int(array.max())))
    except DatasetFilesError as error:
        problem = str(error)
    gathered = distributed.all_gathered((problem, values))
    problems = [problem for problem, _ in gathered if problem]
    if problems:
        raise DatasetFilesError(problems[0])
    merged = {}
    for _, found in gathered:
        for name, extent in found.items():
            _widen(merged, name, extent)
    return merged, warnings


def _widen(values: dict, name: str, extent: tuple[int, int]) -> None:
    low, high = values.get(name, extent)
    values[name] = (min(low, extent[0]), max(high, extent[1]))


def check_datasets(
    datasets: list[ConversationDataset],
    tokenizer_sha256: str | None,
    embedding_rows: int,
    seq_length: int,
) -> list[str]:
    """Checks every dataset, and that all of them were tokenized alike (also when the run names no tokenizer);
    returns warnings (datasets whose files cannot be verified)."""
    values, warnings = scan(datasets)
    first = None
    for dataset in datasets:
        recorded_sha = check_dataset(dataset, tokenizer_sha256, embedding_rows, seq_length, values)
        if first is None:
            first = (dataset, recorded_sha)
        elif recorded_sha != first[1]:
            raise DatasetMismatchError(
                f"{stats_path(dataset.prefix)}: tokenizer sha256 {recorded_sha} differs from "
                f"{stats_path(first[0].prefix)} ({first[1]}); blended datasets must share one tokenizer"
            )
    return warnings


def _provenances(datasets: list[ConversationDataset]) -> list[dict]:
    """Each dataset's recorded provenance (``{}`` where its stats record none)."""
    return [read_stats(dataset.prefix).get("provenance", {}) for dataset in datasets]


def recorded_chat_settings(datasets: list[ConversationDataset]) -> dict | None:
    """What an exported chat template must follow: the default system prompt and the reasoning-history policy
    each dataset was rendered with (``layout.chat_settings``' arguments), or None when a dataset does not record
    its system prompt."""
    provenances = _provenances(datasets)
    if not all("system_prompt" in provenance for provenance in provenances):
        return None
    return {"system_prompts": [provenance["system_prompt"] for provenance in provenances],
            "reasoning_history": [provenance.get("reasoning_history", DEFAULT_REASONING_HISTORY)
                                  for provenance in provenances]}


RENDERING_KEYS = ("loss_mask", "system_prompt", "reasoning_history")  # what makes two datasets' losses comparable


def rendering_differences(
    training: list[ConversationDataset], validation: list[ConversationDataset]
) -> list[list[str]]:
    """Per ``validation`` dataset, how it was rendered unlike every training dataset (loss-mask convention, default
    system prompt, reasoning history), as ``key VALUE (training: VALUES)``; empty when it matches one of them on
    each key or a key is not recorded."""
    trained = _provenances(training)
    recorded = {key: sorted({found[key] for found in trained if key in found}, key=repr) for key in RENDERING_KEYS}
    return [
        [f"{key} {mine[key]!r} (training: {', '.join(map(repr, values))})"
         for key, values in recorded.items() if key in mine and values and mine[key] not in values]
        for mine in _provenances(validation)
    ]
