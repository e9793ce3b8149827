"""Counts what a preprocessing run read, wrote, dropped and truncated, in bounded memory.

Conversation lengths go into a histogram of ``seq_length + 1`` bins (no written conversation is
longer), which gives exact percentiles however many conversations there are.
"""
from __future__ import annotations

import numpy as np

from megatron_qwen.data.encode import BatchSummary


class DatasetStats:
    def __init__(self, seq_length: int):
        self.read = 0
        self.written = 0
        self.rejected = 0
        self.added_by_split = 0
        self.dropped_overlong = 0
        self.truncated = 0
        self.tokens = 0
        self.supervised_tokens = 0
        self.length_histogram = np.zeros(seq_length + 1, dtype=np.int64)

    def add(self, batch: BatchSummary) -> None:
        self.read += batch.rows
        self.written += len(batch.lengths)
        self.rejected += len(batch.rejects)
        self.added_by_split += batch.added_by_split
        self.dropped_overlong += batch.dropped_overlong
        self.truncated += batch.truncated
        self.tokens += int(batch.lengths.sum())
        self.supervised_tokens += batch.supervised_tokens
        self.length_histogram += np.bincount(batch.lengths, minlength=len(self.length_histogram))

    def percentile(self, q: float) -> int:
        """The smallest length that at least ``q`` percent of written conversations do not exceed."""
        cumulative = np.cumsum(self.length_histogram)
        return int(np.searchsorted(cumulative, q / 100 * cumulative[-1]))

    def to_dict(self) -> dict:
        lengths = {}
        if self.written:
            present = np.flatnonzero(self.length_histogram)
            lengths = {"min": int(present[0]), "mean": round(self.tokens / self.written, 2),
                       "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
                       "max": int(present[-1])}
        return {
            "conversations": {"read": self.read, "written": self.written, "rejected": self.rejected,
                              "added_by_split": self.added_by_split, "dropped_overlong": self.dropped_overlong,
                              "truncated": self.truncated},
            "tokens": {"total": self.tokens, "supervised": self.supervised_tokens},
            "conversation_length": lengths,
        }
