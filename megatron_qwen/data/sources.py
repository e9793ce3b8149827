"""Reads the input files as batches of raw rows: JSON Lines (plain or gzip) and Parquet, told apart by
their first bytes.

Rows stay bytes (a JSON object each), so decoding and parsing happen in the worker processes; each keeps
its file index and 1-based line number (a Parquet file's row number) for error messages. Blank lines are
skipped. A file that cannot be read as what its first bytes say raises ``InputError`` naming it.

A Parquet row becomes the JSON object of its ``messages``, ``conversations`` and ``tools`` fields (other
columns are not read) without its null fields. Parquet gives every struct the union of the fields of all
rows: a message without ``tool_calls`` gets ``"tool_calls": null``, a tool's parameters get every other
tool's property names. The conversation parser reads a null and a missing key alike, so dropping nulls
loses nothing it reads, except an explicit null inside a tool schema or call arguments stored as structs.
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from megatron_qwen.data.encode import Row

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
PARQUET_COLUMNS = ("messages", "conversations", "tools")
BATCH_BYTES = 128 * 1024  # small enough that a batch's ids stay in cache while they are joined
_PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
    """An input that cannot be used; the message names the file (and the line or row)."""


def read_batches(paths: Sequence[Path], batch_bytes: int = BATCH_BYTES) -> Iterator[list[Row]]:
    batch: list[Row] = []
    size = 0
    for source, path in enumerate(paths):
        for line_number, data in _rows(Path(path)):
            batch.append(Row(source, line_number, data))
            size += len(data)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line or row number, the row's JSON bytes) of one input file."""
    try:
        with open(path, "rb") as probe:
            magic = probe.read(4)
    except OSError as error:  # removed or made unreadable since the job checked it
        raise InputError(f"{path}: unreadable ({error.strerror})") from None
    if magic == PARQUET_MAGIC:
        return _parquet_rows(path)
    return _json_lines_rows(path, compressed=magic[:2] == GZIP_MAGIC)


def _json_lines_rows(path: Path, compressed: bool) -> Iterator[tuple[int, bytes]]:
    line_number = 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as stream:
            for line_number, line in enumerate(stream, 1):
                data = line.rstrip(b"\r\n")
                if data.strip():
                    yield line_number, data
    except (OSError, EOFError, zlib.error) as error:
        kind = "gzip file" if compressed else "file"
        raise InputError(f"{path}: unreadable {kind} after line {line_number}: {error}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        names = parquet.schema_arrow.names
        if "messages" not in names and "conversations" not in names:
            raise InputError(f'{path}: no "messages" or "conversations" column (it has: {", ".join(names)})')
        columns = [name for name in PARQUET_COLUMNS if name in names]
        number = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            records = batch.to_pylist()
            if any(map(_holds_nulls, batch.columns)):  # most chat data holds none: skip the walk
                records = [_without_nulls(record) for record in records]
            for record in records:
                number += 1
                yield number, _json_row(record, path, number)
    except (OSError, pyarrow.ArrowException) as error:
        raise InputError(f"{path}: unreadable Parquet file: {error}") from None


def _json_row(record: dict, path: Path, number: int) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except TypeError as error:  # a binary or timestamp column, say
        raise InputError(f"{path}:{number}: not a JSON value: {error}") from None


def _holds_nulls(array) -> bool:
    """Whether an Arrow array has a null anywhere, nested values included."""
    import pyarrow

    if array.null_count:
        return True
    if pyarrow.types.is_struct(array.type):
        return any(map(_holds_nulls, array.flatten()))
    if pyarrow.types.is_list(array.type) or pyarrow.types.is_large_list(array.type):
        return _holds_nulls(array.flatten())
    return False


def _without_nulls(value):
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
