"""Turns batches of raw JSON Lines rows into token ids and loss masks (the work a worker process does).

Per row: parse, add the system prompt and, with ``reasoning_history="split"``, make one conversation per
reasoning exchange (``reasoning_history``); per batch: tokenize, fit overlong conversations to the
sequence length (truncate at a turn boundary, or drop), and lay out the ChatML ids and the loss mask.
A batch comes back as its ids and mask (flat numpy arrays) and a summary: the counts, the length of
each written conversation, and the rows that are not conversations (rejects, with their reason, in
input order). The summary is all a worker process sends back; the data goes to a file (``writer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress

import numpy as np

from megatron_qwen.data import reasoning_history
from megatron_qwen.data.chatml import DEFAULT_SYSTEM_PROMPT, ChatMLRenderer, turns_that_fit, with_system_prompt
from megatron_qwen.data.conversations import ConversationError, parse_conversation
from megatron_qwen.data.reasoning_history import DEFAULT_REASONING_HISTORY

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class EncodeSettings:
    loss_mask: str = "assistant"
    seq_length: int = 2048
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    overlong: str = "truncate"
    reasoning_history: str = DEFAULT_REASONING_HISTORY

    def __post_init__(self):
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {self.seq_length}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")
        if self.reasoning_history not in reasoning_history.POLICIES:
            raise ValueError(f"--reasoning-history must be one of {', '.join(reasoning_history.POLICIES)}, "
                             f"got {self.reasoning_history!r}")


@dataclass(frozen=True)
class Row:
    source: int  # index of the input file
    line: int  # 1-based line number in that file
    data: bytes


@dataclass(frozen=True)
class Reject:
    source: int
    line: int
    reason: str
    data: bytes


@dataclass
class BatchSummary:
    """What the main process needs of an encoded batch besides its data: counts, lengths, rejects."""
    rows: int  # conversations read
    lengths: np.ndarray  # int64, tokens per written conversation
    supervised_tokens: int = 0
    added_by_split: int = 0  # conversations beyond one per row, from reasoning_history="split"
    truncated: int = 0
    dropped_overlong: int = 0
    rejects: list[Reject] = field(default_factory=list)


@dataclass
class EncodedBatch:
    ids: np.ndarray  # int32, the written conversations concatenated
    mask: np.ndarray  # uint8, same length as ids
    summary: BatchSummary


class ConversationEncoder:
    """Encodes rows with one tokenizer and one set of settings."""

    def __init__(self, tokenizer, settings: EncodeSettings):
        self.settings = settings
        self.renderer = ChatMLRenderer(tokenizer, settings.loss_mask)

    def encode_batch(self, rows: list[Row]) -> EncodedBatch:
        # The batch's turns are gathered flat, so everything after tokenizing is a few numpy calls per
        # batch rather than Python work per conversation.
        roles: list[int] = []
        contents: list = []
        turn_counts: list[int] = []
        rejects: list[Reject] = []
        added_by_split = 0
        for row in rows:
            try:
                conversation = parse_conversation(row.data)
            except ConversationError as error:
                rejects.append(Reject(row.source, row.line, str(error), row.data))
                continue
            messages = with_system_prompt(conversation.messages, self.settings.system_prompt, conversation.tools)
            made = reasoning_history.samples(messages) if self.settings.reasoning_history == "split" else (messages,)
            added_by_split += len(made) - 1
            turn_counts += [self.renderer.tokenize(sample, roles, contents) for sample in made]
        content_lengths = self.renderer.content_lengths(contents)
        role_indices = np.array(roles, dtype=np.int64)
        fitted = self._fit(role_indices, turn_counts, self.renderer.frame_lengths[role_indices] + content_lengths)
        if fitted.kept_turns is not None:
            roles = list(compress(roles, fitted.kept_turns))
            contents = list(compress(contents, fitted.kept_turns))
            role_indices, content_lengths = role_indices[fitted.kept_turns], content_lengths[fitted.kept_turns]
        mask = self.renderer.mask(role_indices, content_lengths)
        summary = BatchSummary(rows=len(rows), lengths=fitted.lengths, supervised_tokens=int(np.count_nonzero(mask)),
                               added_by_split=added_by_split, truncated=fitted.truncated,
                               dropped_overlong=fitted.dropped, rejects=rejects)
        return EncodedBatch(self.renderer.ids(roles, contents), mask, summary)

    def _fit(self, roles: np.ndarray, turn_counts: list[int], turn_lengths: np.ndarray) -> _Fitted:
        """Fit the batch's conversations to the sequence length: truncate each overlong one at a turn
        boundary (or drop it, with ``overlong="drop"`` or when no exchange fits)."""
        if not turn_counts:
            return _Fitted(None, np.zeros(0, dtype=np.int64))
        starts = np.cumsum(turn_counts) - turn_counts
        lengths = np.add.reduceat(turn_lengths, starts)
        overlong = np.flatnonzero(lengths > self.settings.seq_length)
        if not len(overlong):
            return _Fitted(None, lengths)
        kept_turns = np.ones(len(turn_lengths), dtype=bool)
        written = np.ones(len(lengths), dtype=bool)
        truncated = 0
        for conversation in overlong.tolist():
            turns = slice(starts[conversation], starts[conversation] + turn_counts[conversation])
            kept = 0
            if self.settings.overlong == "truncate":
                kept = turns_that_fit(roles[turns].tolist(), turn_lengths[turns].tolist(), self.settings.seq_length)
            kept_turns[turns.start + kept:turns.stop] = False
            if kept:
                lengths[conversation] = turn_lengths[turns.start:turns.start + kept].sum()
                truncated += 1
            else:
                written[conversation] = False
        return _Fitted(kept_turns, lengths[written], truncated, len(overlong) - truncated)


@dataclass
class _Fitted:
    kept_turns: np.ndarray | None  # bool per turn; None when every turn is kept
    lengths: np.ndarray  # tokens per written conversation
    truncated: int = 0
    dropped: int = 0
