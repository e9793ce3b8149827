"""Turns batches of raw JSON Lines rows into token ids and loss masks (the work a worker process does).

Per row: parse, add the system prompt, render ChatML, and fit overlong conversations to the sequence
length (truncate at a turn boundary, or drop). A batch comes back as flat numpy arrays plus per-row
counts, which are cheap to send between processes; rows that are not conversations come back as rejects
with their reason, in input order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_qwen.data.chatml import (DEFAULT_SYSTEM_PROMPT, ChatMLRenderer, TokenizedConversation, ids_from_parts,
                                       turns_that_fit, with_system_prompt)
from megatron_qwen.data.conversations import ConversationError, parse_conversation

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class EncodeSettings:
    loss_mask: str = "assistant"
    seq_length: int = 2048
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    overlong: str = "truncate"

    def __post_init__(self):
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {self.seq_length}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")


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
class EncodedBatch:
    ids: np.ndarray  # int32, the written conversations concatenated
    mask: np.ndarray  # uint8, same length as ids
    lengths: np.ndarray  # int64, tokens per written conversation
    rows: int = 0  # conversations read
    truncated: int = 0
    dropped_overlong: int = 0
    rejects: list[Reject] = field(default_factory=list)


class ConversationEncoder:
    """Encodes rows with one tokenizer and one set of settings."""

    def __init__(self, tokenizer, settings: EncodeSettings):
        self.settings = settings
        self.renderer = ChatMLRenderer(tokenizer, settings.loss_mask)

    def encode_row(self, row: bytes) -> tuple[TokenizedConversation, int, bool] | None:
        """The tokenized conversation of one row, its token count and whether it was truncated, or None
        when it is too long and cannot be cut to fit; raises ConversationError for a row that is not a
        conversation."""
        messages = with_system_prompt(parse_conversation(row), self.settings.system_prompt)
        conversation = self.renderer.tokenize(messages)
        lengths = self.renderer.turn_lengths(conversation)
        length = sum(lengths)
        if length <= self.settings.seq_length:
            return conversation, length, False
        if self.settings.overlong == "drop":
            return None
        kept = turns_that_fit(conversation.roles, lengths, self.settings.seq_length)
        return (conversation.head(kept), sum(lengths[:kept]), True) if kept else None

    def encode_batch(self, rows: list[Row]) -> EncodedBatch:
        parts: list = []
        roles: list[int] = []
        content_lengths: list[int] = []
        lengths: list[int] = []
        batch = EncodedBatch(ids=None, mask=None, lengths=None, rows=len(rows))
        for row in rows:
            try:
                encoded = self.encode_row(row.data)
            except ConversationError as error:
                batch.rejects.append(Reject(row.source, row.line, str(error), row.data))
                continue
            if encoded is None:
                batch.dropped_overlong += 1
                continue
            conversation, length, truncated = encoded
            self.renderer.frame(parts, conversation)
            roles += conversation.roles
            content_lengths += map(len, conversation.contents)
            lengths.append(length)
            batch.truncated += truncated
        batch.ids = ids_from_parts(parts)
        batch.mask = self.renderer.mask(roles, content_lengths)
        batch.lengths = np.array(lengths, dtype=np.int64)
        return batch
