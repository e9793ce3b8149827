"""Reads JSON Lines inputs (plain or gzip, told apart by their first bytes) as batches of raw rows.

Rows stay bytes, so decoding and parsing happen in the worker processes; each keeps its file index
and 1-based line number for error messages. Blank lines are skipped.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from megatron_qwen.data.encode import Row

GZIP_MAGIC = b"\x1f\x8b"
BATCH_BYTES = 128 * 1024  # small enough that a batch's ids stay in cache while they are joined


def open_input(path: Path) -> BinaryIO:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def read_batches(paths: Sequence[Path], batch_bytes: int = BATCH_BYTES) -> Iterator[list[Row]]:
    batch: list[Row] = []
    size = 0
    for source, path in enumerate(paths):
        with open_input(path) as stream:
            for line_number, line in enumerate(stream, 1):
                data = line.rstrip(b"\r\n")
                if not data.strip():
                    continue
                batch.append(Row(source, line_number, data))
                size += len(data)
                if size >= batch_bytes:
                    yield batch
                    batch, size = [], 0
    if batch:
        yield batch
