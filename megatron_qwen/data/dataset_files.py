"""The files of an SFT dataset named by its PREFIX, and how they appear all at once or not at all.

``PREFIX_text_document.{bin,idx}`` (token ids, int32), ``PREFIX_loss_mask_document.{bin,idx}`` (one
byte per token), ``PREFIX_stats.json`` (counts and provenance), and with ``--on-error skip``
``PREFIX_rejects.jsonl``. Everything is written into a hidden staging folder beside PREFIX and then
renamed into place; ``PREFIX_stats.json`` is removed first and renamed last, and records the size of
every other file, so a dataset is complete exactly when its stats file exists and the sizes match
(``read_stats`` checks). A run killed at any moment leaves at most a staging folder, which the next
run with the same PREFIX removes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

from megatron_qwen.platform.paths import folder_problem

TEXT_SUFFIX = "_text_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"
STATS_SUFFIX = "_stats.json"
REJECTS_SUFFIX = "_rejects.jsonl"
_STAGING_MARK = ".partial-"


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


# megatron-core's .idx layout (indexed_dataset._IndexReader): magic, version 1, dtype code, sequence count,
# document count; then an int32 length and an int64 pointer per sequence and an int64 index per document
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = struct.Struct("<9sQBQQ")


def check_index(path_prefix: str | Path) -> None:
    """``DatasetFilesError`` naming ``PATH_PREFIX.idx`` when megatron-core could not read it: another magic or
    version, or counts that do not fit the file's size (megatron-core fails on either with an assertion or a
    numpy error that names nothing)."""
    path = Path(f"{path_prefix}.idx")
    with open(path, "rb") as file:
        header = file.read(_INDEX_HEADER.size)
    if len(header) < _INDEX_HEADER.size or not header.startswith(_INDEX_MAGIC):
        raise DatasetFilesError(f"{path}: not a megatron-core index (its first bytes are not {_INDEX_MAGIC!r})")
    _, version, _, sequences, documents = _INDEX_HEADER.unpack(header)
    size, expected = path.stat().st_size, _INDEX_HEADER.size + sequences * 12 + documents * 8
    if version != 1 or size != expected:
        raise DatasetFilesError(f"{path}: corrupt index (version {version}, {sequences} sequences and {documents} "
                                f"documents, which take {expected} bytes; the file has {size})")


def indexed_dataset_module():
    """megatron-core's ``indexed_dataset`` module, imported when first needed (the import costs seconds)
    and without its optional-dependency warnings, which concern training, not reading or writing data."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
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
        """Move the staged files into place, recording their sizes in the stats file written last;
        returns the stats as written."""
        final_stats, stale_rejects = stats_path(self.prefix), rejects_path(self.prefix)
        committed = [f for f in [*data_files(self.prefix), stale_rejects] if self.staged(f).exists()]
        stats = {**stats, "files": {f.name: self.staged(f).stat().st_size for f in committed}}
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
