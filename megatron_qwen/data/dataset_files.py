"""The files of an SFT dataset named by its PREFIX, and how they appear all at once or not at all.

``PREFIX_text_document.{bin,idx}`` (token ids, int32), ``PREFIX_loss_mask_document.{bin,idx}`` (one
byte per token), ``PREFIX_stats.json`` (counts and provenance), and with ``--on-error skip``
``PREFIX_rejects.jsonl``. Everything is written into a hidden staging folder beside PREFIX and then
renamed into place; ``PREFIX_stats.json`` is removed first and renamed last, and records the size of
every other file, so a dataset is complete exactly when its stats file exists and the sizes match
(``read_stats`` checks). A run killed at any moment leaves at most a staging folder, which the next
run with the same PREFIX removes.

The stats also record the sha256 of every ``DIGEST_CHUNK_BYTES`` of each indexed-dataset file
(``"digests"``), so that a reader can verify the bytes in shares (``data_chunks``, ``read_chunk``: the trainer
splits them over its ranks); datasets written before digests were recorded have none and are not verified.
``check_index`` reads an ``.idx`` header before megatron-core does, which would fail on a damaged one with an
assertion or read past the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_qwen.platform.fallbacks import FALLBACK_WARNING
from megatron_qwen.platform.paths import folder_problem

TEXT_SUFFIX = "_text_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"
STATS_SUFFIX = "_stats.json"
REJECTS_SUFFIX = "_rejects.jsonl"
_STAGING_MARK = ".partial-"
DIGEST_CHUNK_BYTES = 64 << 20
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_INDEX_MAGIC = b"MMIDIDX\x00\x00"


class DatasetFilesError(ValueError):
    """A dataset that is missing, incomplete, or does not match its stats file."""


class OutputError(ValueError):
    """A dataset that cannot be written where PREFIX says; the message names PREFIX and the reason."""


def output_prefix(prefix: str | Path) -> Path:
    """``prefix`` as a Path, once it can name files: ``OutputError`` when it ends in a path separator (the
    files would be named after the folder and land beside it) or a folder it needs is a file."""
    if str(prefix).endswith(("/", os.sep)):
        raise OutputError(f"--output-prefix {prefix}: ends in a path separator; a PREFIX names the files too, "
                          f"e.g. {prefix}chats")
    problem = folder_problem(Path(prefix).parent)
    if problem:
        raise OutputError(f"--output-prefix {prefix}: {problem}")
    return Path(prefix)


def text_prefix(prefix: str | Path) -> str:
    return f"{prefix}{TEXT_SUFFIX}"


def loss_mask_prefix(prefix: str | Path) -> str:
    return f"{prefix}{LOSS_MASK_SUFFIX}"


def stats_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{STATS_SUFFIX}")


def rejects_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{REJECTS_SUFFIX}")


def data_files(prefix: str | Path) -> list[Path]:
    """The indexed-dataset files, in the order they are committed."""
    return [Path(p + ext) for p in (text_prefix(prefix), loss_mask_prefix(prefix)) for ext in (".bin", ".idx")]


def indexed_dataset_module():
    """megatron-core's ``indexed_dataset`` module, imported when first needed (the import costs seconds)
    and without its optional-dependency warnings, which concern training, not reading or writing data."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FALLBACK_WARNING)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def read_stats(prefix: str | Path) -> dict:
    """The stats of a complete dataset; ``DatasetFilesError`` naming the file when the stats file is missing or
    unreadable, or another file of the dataset is missing or not the size the stats recorded."""
    path = stats_path(prefix)
    if not path.is_file():
        raise DatasetFilesError(f"{path}: missing; every dataset PREFIX needs it (run tools/preprocess_chatml.py)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFilesError(f"{path}: unreadable ({error})") from error
    files = stats.get("files") if isinstance(stats, dict) else None
    if not isinstance(files, dict):
        raise DatasetFilesError(f"{path}: records no file sizes; rebuild the dataset with tools/preprocess_chatml.py")
    for name, size in files.items():
        file = path.parent / name
        if not file.is_file() or file.stat().st_size != size:
            raise DatasetFilesError(f"dataset {prefix} is incomplete: {file} is missing or not {size} bytes")
    return stats


def file_records(files: list[Path]) -> dict:
    """What the stats record of the dataset's ``files``: ``{"files": {name: size}, "digests": ...}``."""
    digests = {path.name: [hashlib.sha256(chunk).hexdigest() for chunk in _chunks_of(path)]
               for path in files if path.suffix in (".bin", ".idx")}
    return {"files": {path.name: path.stat().st_size for path in files},
            "digests": {"chunk_bytes": DIGEST_CHUNK_BYTES, "sha256": digests}}


def _chunks_of(path: Path):
    with open(path, "rb") as stream:
        yield from iter(lambda: stream.read(DIGEST_CHUNK_BYTES), b"")


@dataclass(frozen=True)
class DataChunk:
    """``size`` bytes of ``path`` from ``offset``, with the sha256 the stats recorded for them (``None``: none)."""
    path: Path
    offset: int
    size: int
    sha256: str | None


def data_chunks(prefix: str | Path, stats: dict) -> list[DataChunk]:
    """The indexed-dataset files of ``prefix`` in chunks, each with its recorded digest; for stats without digests
    (written before they were recorded) the chunks carry none."""
    recorded = stats.get("digests") or {}
    size = recorded.get("chunk_bytes", DIGEST_CHUNK_BYTES)
    chunks = []
    for path in data_files(prefix):
        digests = recorded.get("sha256", {}).get(path.name)
        total = path.stat().st_size
        offsets = range(0, total, size)
        if digests is not None and len(digests) != len(offsets):
            raise DatasetFilesError(f"{stats_path(prefix)}: records {len(digests)} digests for {path}, which has "
                                    f"{len(offsets)} chunks of {size} bytes")
        chunks += [DataChunk(path, offset, min(size, total - offset), digests[number] if digests else None)
                   for number, offset in enumerate(offsets)]
    return chunks


def read_chunk(chunk: DataChunk) -> bytes:
    """The chunk's bytes, checked against its recorded digest (``DatasetFilesError`` naming the file)."""
    with open(chunk.path, "rb") as stream:
        stream.seek(chunk.offset)
        data = stream.read(chunk.size)
    if chunk.sha256 is not None and hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise DatasetFilesError(f"{chunk.path}: bytes {chunk.offset}..{chunk.offset + chunk.size} differ from the "
                                "sha256 recorded when the dataset was written (damaged or edited); rebuild the dataset")
    return data


def check_index(idx_path: Path, dtype: type, element_bytes: int) -> None:
    """A megatron-core ``.idx`` whose header, size and sequence layout fit a ``.bin`` of ``element_bytes``-byte
    elements; ``dtype`` is the expected element type. Raises ``DatasetFilesError`` naming the file."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as stream:
        header = stream.read(_INDEX_HEADER.size)
    if len(header) < _INDEX_HEADER.size or not header.startswith(_INDEX_MAGIC):
        raise DatasetFilesError(f"{idx_path}: not a megatron-core index (bad magic); rebuild the dataset")
    _, version, code, sequences, documents = _INDEX_HEADER.unpack(header)
    expected_code = indexed_dataset_module().DType.code_from_dtype(dtype)
    if version != 1 or code != expected_code:
        raise DatasetFilesError(f"{idx_path}: index version {version} with dtype code {code}, expected version 1 and "
                                f"code {expected_code}; rebuild the dataset")
    expected = _INDEX_HEADER.size + 12 * sequences + 8 * documents
    if size != expected:
        raise DatasetFilesError(f"{idx_path}: its header counts {sequences} sequences and {documents} documents, which "
                                f"take {expected} bytes, but the file has {size}")
    index = np.memmap(idx_path, mode="r", offset=_INDEX_HEADER.size)
    lengths = np.frombuffer(index, np.int32, sequences)
    pointers = np.frombuffer(index, np.int64, sequences, offset=4 * sequences)
    document_indices = np.frombuffer(index, np.int64, documents, offset=12 * sequences)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * element_bytes if sequences else []
    if (lengths < 0).any() or not np.array_equal(pointers, starts) or documents == 0 \
            or document_indices[-1] != sequences or (np.diff(document_indices) < 0).any():
        raise DatasetFilesError(f"{idx_path}: its sequence lengths, offsets and document indices disagree; rebuild "
                                "the dataset")
    data = idx_path.with_suffix(".bin")
    described = int(lengths.sum(dtype=np.int64)) * element_bytes
    if data.stat().st_size != described:
        raise DatasetFilesError(f"{data}: {data.stat().st_size} bytes, but its index {idx_path.name} describes "
                                f"{described}; rebuild the dataset")


class StagedDataset:
    """A staging folder for one PREFIX: write files into ``staged(final_path)``, then ``commit``."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.prefix)
        self.folder = self.prefix.parent / f".{self.prefix.name}{_STAGING_MARK}{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()

    def staged(self, final: Path | str) -> Path:
        return self.folder / Path(final).name

    def commit(self, stats: dict) -> dict:
        """Move the staged files into place, recording their sizes and digests in the stats file written last;
        returns the stats as written."""
        final_stats, stale_rejects = stats_path(self.prefix), rejects_path(self.prefix)
        committed = [f for f in [*data_files(self.prefix), stale_rejects] if self.staged(f).exists()]
        stats = {**stats, **file_records([self.staged(f) for f in committed])}
        # written before anything under PREFIX changes: a full disk then leaves the previous dataset as it was
        staged_stats = self.staged(final_stats)
        staged_stats.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        final_stats.unlink(missing_ok=True)
        stale_rejects.unlink(missing_ok=True)
        for final in committed:
            os.replace(self.staged(final), final)
        os.replace(staged_stats, final_stats)
        self.discard()
        return stats

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def remove_stale_staging(prefix: Path) -> None:
    """Remove staging folders of this PREFIX left by runs that were killed (their process is gone)."""
    for folder in prefix.parent.glob(f".{prefix.name}{_STAGING_MARK}*"):
        pid = folder.name.rsplit(_STAGING_MARK, 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
