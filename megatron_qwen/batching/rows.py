"""Filling rows with conversations (pad, pack or padfree) and collating rows into a micro-batch of tensors.

A row has ``seq_length`` model positions. Each conversation is shifted on its own (``input = tokens[:-1]``,
``labels = tokens[1:]``, ``loss_mask = mask[1:]``) before it is placed, so a conversation of ``n`` tokens
takes ``n - 1`` positions and the first token of a conversation is never the target of the one before it.

- ``pad``: a global batch of ``count`` conversations, one per row, the rest of the row padding (never
  supervised). The micro-batch is the usual ``[micro_batch_size, seq_length]`` batch with causal attention;
  positions run ``0 .. seq_length-1``.
- ``pack``: a global batch of ``count`` rows, packed best-fit (``next_rows``): all its rows are open at once,
  each conversation of the stream goes into the row with the least free space that still holds it, and the
  first one that fits in no row starts the next global batch. Only a prefix of the stream is consumed, so the
  data position stays the sampler's draw counts. Best-fit over the whole batch, rather than closing each row at
  the first conversation that does not fit, is what fills rows well (docs/performance.md has the figures).
- ``padfree``: a global batch of ``count`` conversations, the same ones ``pad`` takes, so the update (loss,
  gradients, data position) is ``pad``'s; but they are packed, longest first, each into the row with the
  least free space that holds it (a new row when none does), and all-padding rows are added up to a multiple
  of ``row_multiple`` (data-parallel size x micro-batch size, x pipeline size when interleaved) so that every
  rank runs the same number of micro-batches. The number of rows, and so the compute of an update, follows
  the conversations' lengths: about a third of ``pad``'s on a typical SFT length distribution.

``pack`` and ``padfree`` micro-batches are one THD sequence ``[1, micro_batch_size * seq_length]``: the rows
are concatenated and ``cu_seqlens`` lists every conversation's boundary of every row (and the padding tail of
a row as a segment of its own, so segments tile the sequence); positions restart at 0 in every segment. Give
the pipeline schedule ``seq_length * micro_batch_size`` and micro-batch size 1 (``schedule_shape``), and every
pipeline stage the same ``packed_seq_params()``.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.batching.dataset import ConversationDataset

# A row is the tuple of (dataset index, conversation id) it holds; () is an all-padding row.
Row = tuple[tuple[int, int], ...]
ROW_MODES = ("pad", "pack", "padfree")
PACKED_ROW_MODES = ("pack", "padfree")  # collated as one THD sequence per micro-batch


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch, ready for ``GPTModel(tokens, position_ids, None, labels=labels, packed_seq_params=...)``."""

    tokens: torch.Tensor  # [b, s] int64 model input
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float32, 1 on supervised positions
    padding_mask: torch.Tensor  # [b, s] bool, True on padding positions (a mixture of experts' routers skip them)
    position_ids: torch.Tensor  # [b, s] int64
    cu_seqlens: torch.Tensor | None  # [segments + 1] int32, packed only
    max_seqlen: int | None  # longest segment, packed only

    def packed_seq_params(self):
        """megatron-core's ``PackedSeqParams`` for the THD path, or ``None`` for padded rows."""
        if self.cu_seqlens is None:
            return None
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


@dataclasses.dataclass(frozen=True)
class ScheduleShape:
    """What megatron's pipeline schedule is told about one micro-batch: the ``seq_length`` and
    ``micro_batch_size`` it sends between stages."""

    seq_length: int
    micro_batch_size: int


def schedule_shape(row_mode: str, seq_length: int, micro_batch_size: int) -> ScheduleShape:
    """The shape of micro-batches of ``micro_batch_size`` rows (``--rows``): a packed micro-batch is one sequence."""
    if row_mode in PACKED_ROW_MODES:
        return ScheduleShape(seq_length * micro_batch_size, 1)
    return ScheduleShape(seq_length, micro_batch_size)


def check_fits(dataset: ConversationDataset, conversation: int, seq_length: int) -> int:
    """Positions the conversation takes; a clear error when it cannot fill even a row of its own."""
    positions = dataset.num_positions(conversation)
    if positions < 1:
        raise ValueError(f"dataset {dataset.prefix!r}: conversation {conversation} has fewer than 2 tokens")
    if positions > seq_length:
        raise ValueError(
            f"dataset {dataset.prefix!r}: conversation {conversation} has {positions + 1} tokens, more than a row "
            f"of {seq_length} positions holds; rebuild the dataset with --seq-length {seq_length}"
        )
    return positions


class _BestFit:
    """Rows being filled best-fit: a conversation goes into the row with the least free space that still holds
    it (ties: the lowest row). The free space is kept sorted and searched by bisection: a linear scan of a
    1024-row batch's rows per conversation costs tens of times more (docs/performance.md)."""

    def __init__(self, seq_length: int, one_per_row: bool):
        self.seq_length = seq_length
        self.one_per_row = one_per_row  # a padded row is full with one conversation
        self.rows: list[list[tuple[int, int]]] = []
        self.free: list[tuple[int, int]] = []  # (free positions, row), sorted

    def open(self, count: int = 1) -> None:
        for _ in range(count):
            self.rows.append([])
            bisect.insort(self.free, (self.seq_length, len(self.rows) - 1))

    def place(self, positions: int, item: tuple[int, int]) -> bool:
        """Puts ``item`` into its best row; ``False`` when no open row has room for it."""
        slot = bisect.bisect_left(self.free, (positions, -1))
        if slot == len(self.free):
            return False
        space, row = self.free.pop(slot)
        self.rows[row].append(item)
        if not self.one_per_row:
            bisect.insort(self.free, (space - positions, row))
        return True

    def result(self) -> list[Row]:
        return [tuple(row) for row in self.rows]


def next_rows(
    row_mode: str,
    count: int,
    peek: Callable[[], tuple[int, int] | None],
    take: Callable[[], tuple[int, int]],
    datasets: Sequence[ConversationDataset],
    seq_length: int,
    row_multiple: int = 1,
) -> list[Row]:
    """The rows of the next global batch, from a prefix of the stream: ``count`` rows (``pad``, ``pack``) or the
    rows of ``count`` conversations (``padfree``; a multiple of ``row_multiple``), see the module docstring.

    ``peek`` shows the next conversation (``None`` at the end of a finite stream), ``take`` consumes it. In
    ``pad`` and ``pack`` the first conversation no row holds is left in the stream; a padded row holds one
    conversation, so with ``pad`` the rows take the stream in order. Rows the end of a finite stream leaves
    empty are all-padding rows ``()``, always the last ones.
    """
    if row_mode == "padfree":
        return _conversation_rows(count, peek, take, datasets, seq_length, row_multiple)
    fit = _BestFit(seq_length, one_per_row=row_mode == "pad")
    fit.open(count)
    while (item := peek()) is not None and fit.place(check_fits(datasets[item[0]], item[1], seq_length), item):
        take()
    return fit.result()


def _conversation_rows(count, peek, take, datasets, seq_length, row_multiple) -> list[Row]:
    """``padfree``: the next ``count`` conversations of the stream, longest first (ties in stream order) into
    their best rows, opening a row when none holds one; then all-padding rows up to a multiple of
    ``row_multiple``."""
    items = []
    while len(items) < count and (item := peek()) is not None:
        items.append((check_fits(datasets[item[0]], item[1], seq_length), take()))
    fit = _BestFit(seq_length, one_per_row=False)
    for positions, item in sorted(items, key=lambda entry: -entry[0]):
        if not fit.place(positions, item):
            fit.open()
            fit.place(positions, item)
    fit.open(-len(fit.rows) % row_multiple)
    return fit.result()


def batches_from_list(
    row_mode: str,
    items: Sequence[tuple[int, int]],
    count: int,
    datasets: Sequence[ConversationDataset],
    seq_length: int,
    row_multiple: int = 1,
) -> list[list[Row]]:
    """Global batches (``count`` as in ``next_rows``) holding every conversation of a finite list once (the
    validation set)."""
    cursor = 0

    def peek():
        return items[cursor] if cursor < len(items) else None

    def take():
        nonlocal cursor
        cursor += 1
        return items[cursor - 1]

    batches = []
    while cursor < len(items):
        batches.append(next_rows(row_mode, count, peek, take, datasets, seq_length, row_multiple))
    return batches


def _segments(row: Row, datasets: Sequence[ConversationDataset]) -> list[tuple[np.ndarray, ...]]:
    segments = []
    for dataset, conversation in row:
        tokens, mask = datasets[dataset].conversation(conversation)
        segments.append((tokens[:-1], tokens[1:], mask[1:].astype(np.float32)))
    return segments


def _padding(length: int, pad_token_id: int) -> tuple[np.ndarray, ...]:
    return (
        np.full(length, pad_token_id, dtype=np.int64),
        np.full(length, pad_token_id, dtype=np.int64),
        np.zeros(length, dtype=np.float32),
    )


def collate(
    row_mode: str,
    rows: Sequence[Row],
    datasets: Sequence[ConversationDataset],
    seq_length: int,
    pad_token_id: int,
) -> MicroBatch:
    """The micro-batch of ``rows`` (see the module docstring for the two layouts)."""
    tokens, labels, loss_mask, padding, positions, segment_lengths = [], [], [], [], [], []
    for row in rows:
        segments = _segments(row, datasets)
        used = sum(len(segment[0]) for segment in segments)
        padding += [np.zeros(used, dtype=bool), np.ones(seq_length - used, dtype=bool)]
        if used < seq_length:
            segments.append(_padding(seq_length - used, pad_token_id))
        for segment_tokens, segment_labels, segment_mask in segments:
            tokens.append(segment_tokens)
            labels.append(segment_labels)
            loss_mask.append(segment_mask)
            segment_lengths.append(len(segment_tokens))
            positions.append(np.arange(len(segment_tokens)))
    packed = row_mode in PACKED_ROW_MODES
    batch_rows = 1 if packed else len(rows)
    as_batch = lambda parts: torch.from_numpy(np.concatenate(parts)).reshape(batch_rows, -1)  # noqa: E731
    if not packed:  # a padded row's positions run on through its padding
        positions = [np.arange(seq_length)] * len(rows)
    return MicroBatch(
        tokens=as_batch(tokens),
        labels=as_batch(labels),
        loss_mask=as_batch(loss_mask),
        padding_mask=as_batch(padding),
        position_ids=as_batch(positions).to(torch.int64),
        cu_seqlens=torch.tensor(np.cumsum([0] + segment_lengths), dtype=torch.int32) if packed else None,
        max_seqlen=int(max(segment_lengths)) if packed else None,
    )
