"""The checkpoint directory shared by the converter and the trainer.

::

    CHECKPOINT_DIR/
      latest                  the newest complete iteration's number, e.g. "200"
      iter_0000000/           written by ``convert_checkpoint.py hf-to-mcore``
      iter_0000200/           written by the trainer
        metadata.json, common.pt, __*.distcp, .metadata   megatron-core distributed checkpoint
        model_config.json     the QwenConfig the weights belong to
        tokenizer/            the tokenizer files, and manifest.json with their sha256
        chat.json             (trainer) the default system prompts of the datasets it trained on
        ...                   files a caller adds (e.g. the trainer's state)
        manifest.json         every other file's size and sha256, written last (``checkpoint/manifest.py``)

Every iteration directory is complete on its own. The distributed checkpoint stores each tensor at
its global shape, whatever tensor/pipeline-parallel layout saved it, so any layout loads it.

Writes are atomic from a reader's point of view: an iteration is written into
``iter_NNNNNNN.partial``, renamed into place once complete, and only then is ``latest`` replaced
(by renaming a fully written temporary file). A crash or a kill during a save leaves a ``.partial``
(or ``.old``) directory behind; the next save removes all of them, whatever their iteration, before it
writes (a large model's leftover holds hundreds of GB, which the new save may need). A save that fails on any
rank (a full disk) raises ``CheckpointSaveError`` on every rank, after removing its ``.partial``. Collective calls
(``save_iteration``, ``load_model``) run on every rank; file-system changes are made by global rank 0 on a
file system all ranks share.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qwen.checkpoint import manifest, writer_processes
from megatron_qwen.checkpoint.manifest import sha256_file
from megatron_qwen.checkpoint.mapping import EMBEDDING
from megatron_qwen.data.reasoning_history import DEFAULT_REASONING_HISTORY
from megatron_qwen.models.presets import QwenConfig
from megatron_qwen.platform.distributed import all_gathered, on_any_rank, rank_and_size

LATEST = "latest"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_MANIFEST = "manifest.json"
CHAT_SETTINGS = "chat.json"
_ITERATION_RE = re.compile(r"iter_(\d{7})")
_LEFTOVER_RE = re.compile(r"iter_\d{7}\.(partial|old)")


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def list_iterations(root: str | Path) -> list[int]:
    """Numbers of the complete iteration directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_ITERATION_RE.fullmatch(path.name) for path in root.iterdir() if path.is_dir())
    return sorted(int(match.group(1)) for match in found if match)


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the ``latest`` marker names, or None when there is none yet."""
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    text = marker.read_bytes().decode(errors="replace").strip() if marker.is_file() else None
    if text is None or not text.isdigit():
        found = "a directory" if text is None else repr(text[:40])
        raise ValueError(
            f"{marker}: expected an iteration number, found {found} (iterations found: {list_iterations(root) or 'none'})"
        )
    return int(text)


def resolve_iteration(root: str | Path, iteration: int | None = None) -> Path:
    """The directory of ``iteration`` (default: the latest) under ``root``, with clear errors."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(
                f"{root} has no '{LATEST}' marker: not a megatron-qwen checkpoint directory "
                f"(iterations found: {list_iterations(root) or 'none'})"
            )
    path = root / iteration_name(iteration)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path}: no complete iteration {iteration} (iterations found: {list_iterations(root) or 'none'})"
        )
    return path


def load_config(iteration_dir: str | Path) -> QwenConfig:
    path = Path(iteration_dir) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; every iteration directory holds its model configuration")
    try:
        return QwenConfig.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a model configuration ({type(error).__name__}: {error})") from None


def tokenizer_dir(iteration_dir: str | Path) -> Path:
    return Path(iteration_dir) / TOKENIZER_DIR


def tokenizer_manifest(iteration_dir: str | Path) -> dict:
    """The recorded tokenizer (``provenance`` fields plus ``files``: name -> sha256), checked against
    the files on disk."""
    folder = tokenizer_dir(iteration_dir)
    manifest_path = folder / TOKENIZER_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing; every iteration directory holds its tokenizer")
    manifest = json.loads(manifest_path.read_text())
    for name, recorded in manifest["files"].items():
        actual = sha256_file(folder / name)
        if actual != recorded:
            raise ValueError(f"{folder / name}: sha256 {actual} differs from {recorded} recorded in {manifest_path}")
    return manifest


@dataclass(frozen=True)
class StoredTokenizer:
    """An iteration's tokenizer as its manifest records it: what a run that only checks and copies the
    tokenizer needs (a trainer), without the encoder that ``load_tokenizer`` builds (~1 s per process). The files'
    bytes are read once, at the start: a run resumed from an iteration writes them into its own iterations, and
    pruning may delete the one they came from."""
    contents: dict[str, bytes]
    manifest: dict

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def provenance(self) -> dict:
        return {key: value for key, value in self.manifest.items() if key != "files"}


def stored_tokenizer(iteration_dir: str | Path) -> StoredTokenizer:
    manifest = tokenizer_manifest(iteration_dir)
    folder = tokenizer_dir(iteration_dir)
    return StoredTokenizer({name: (folder / name).read_bytes() for name in manifest["files"]}, manifest)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """Name -> bytes of the files of a ``StoredTokenizer`` or of a loaded ``ChatTokenizer``."""
    if isinstance(tokenizer, StoredTokenizer):
        return tokenizer.contents
    return {source.name: source.read_bytes() for source in tokenizer.files}


def chat_settings(system_prompts: list[str], reasoning_history: list[str]) -> str:
    """The ``chat.json`` content for a model trained on datasets rendered with these default system prompts and
    reasoning-history policies (one of each per dataset)."""
    settings = {"system_prompts": sorted(set(system_prompts)), "reasoning_history": sorted(set(reasoning_history))}
    return json.dumps(settings, indent=1, ensure_ascii=False) + "\n"


def training_chat_settings(iteration_dir: str | Path) -> dict | None:
    """What the iteration's training data was rendered with, as ``chat_settings`` lists it (``None``: not
    trained here)."""
    path = Path(iteration_dir) / CHAT_SETTINGS
    if not path.is_file():
        return None
    return {"reasoning_history": [DEFAULT_REASONING_HISTORY], **json.loads(path.read_text())}  # older files have none


def checkpoint_dtype(iteration_dir: str | Path) -> torch.dtype:
    """The dtype the model weights were saved in (read from the checkpoint's metadata)."""
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(iteration_dir))
    except Exception as error:
        raise ValueError(damaged_file(iteration_dir) or f"{iteration_dir}: unreadable ({error})") from None
    return metadata[EMBEDDING].dtype


def damaged_file(iteration_dir: str | Path) -> str | None:
    """What is wrong with which file of a distributed checkpoint that failed to load: ``common.pt`` or ``.metadata``
    that cannot be unpickled, or a shard missing or shorter than the data ``.metadata`` places in it; None when
    none of these is found. Reads little: the two small files and the shards' sizes."""
    iteration_dir = Path(iteration_dir)
    common = iteration_dir / "common.pt"
    try:
        torch.load(common, map_location="cpu")  # as megatron-core reads it (weights only)
    except Exception as error:
        return f"{common}: unreadable ({type(error).__name__}); the iteration cannot be loaded"
    try:
        metadata = FileSystemReader(str(iteration_dir)).read_metadata()
    except Exception as error:
        return (f"{iteration_dir / '.metadata'}: unreadable ({type(error).__name__}: {error}); the iteration cannot be "
                "loaded")
    ends: dict[str, int] = {}
    for stored in metadata.storage_data.values():
        ends[stored.relative_path] = max(ends.get(stored.relative_path, 0), stored.offset + stored.length)
    for name, end in sorted(ends.items()):
        shard = iteration_dir / name
        if not shard.is_file():
            return f"{shard}: missing; the iteration cannot be loaded"
        if shard.stat().st_size < end:
            return f"{shard}: truncated ({shard.stat().st_size} bytes, {end} expected); the iteration cannot be loaded"
    return None


def save_iteration(
    root: str | Path,
    iteration: int,
    sharded_state_dict: dict,
    *,
    model_config: QwenConfig,
    tokenizer,
    extra_files: Mapping[str, str | bytes] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Writes iteration ``iteration`` (collective: every rank calls it) and makes it the latest.

    ``sharded_state_dict`` is what ``dist_checkpointing.save`` takes (the model's, and the
    optimizer's if any); ``tokenizer`` is a loaded ``megatron_qwen.data.tokenizer.ChatTokenizer`` or a
    ``StoredTokenizer``, whose files are copied; ``extra_files`` maps names inside the iteration directory
    to contents. With ``keep_last`` only that many newest iterations are kept afterwards.
    """
    root = Path(root)
    final = root / iteration_name(iteration)
    staging = root / f"{final.name}.partial"
    if _is_writer():
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        staging.mkdir()
    _barrier()
    failure, shards = None, {}
    try:
        writer_processes.save(sharded_state_dict, staging)
        shards = manifest.describe(staging, manifest.own_shards(staging, rank_and_size()[0]))  # (manifest's docstring)
    except (Exception, CheckpointException) as error:  # torch's checkpoint errors are BaseExceptions
        failure = error
    written = all_gathered((shards, failure is not None))
    try:
        if _is_writer() and not any(failed for _, failed in written):
            for name, content in {MODEL_CONFIG: model_config.to_json() + "\n", **(extra_files or {})}.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
            _write_tokenizer(staging / TOKENIZER_DIR, tokenizer)
            manifest.write(staging, {name: entry for described, _ in written for name, entry in described.items()})
            _replace_dir(staging, final)
            _write_atomically(root / LATEST, f"{iteration}\n")
            if keep_last is not None:
                prune(root, keep_last)
    except Exception as error:
        failure = error  # a full disk, a lost mount: every rank must stop, none may wait at a barrier
    (failed,) = on_any_rank(failure is not None)  # also the barrier that ends a save
    if failed:
        if _is_writer():
            shutil.rmtree(staging, ignore_errors=True)  # the space it holds may be what the next attempt needs
        raise CheckpointSaveError(_save_failure(root, iteration, failure)) from failure
    return final


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank; raised on every rank. The iterations saved before are intact."""


def _save_failure(root: Path, iteration: int, error: BaseException | None) -> str:
    if error is None or (isinstance(error, CheckpointException) and not error.failures):
        cause = "on another rank"
    else:  # the last line of a write error's text names it (the rest is a traceback of the writer's thread)
        lines = str(error).strip().splitlines()
        cause = lines[-1] if lines else type(error).__name__
    latest = latest_iteration(root)
    kept = "no earlier iteration is there" if latest is None else f"the latest, iteration {latest}, is intact"
    free = shutil.disk_usage(root).free / 2**30
    return f"{root}: saving iteration {iteration} failed ({cause}); {kept}; {free:.1f} GiB free on its file system"


def load_model(model: torch.nn.Module, iteration_dir: str | Path) -> None:
    """Loads the weights of ``iteration_dir`` into ``model`` (collective; any TP/PP layout).

    ``model`` is an unwrapped ``GPTModel`` (not megatron's DDP wrapper, whose keys carry a prefix).
    The result of a load also holds the checkpoint's non-tensor entries (a trainer's checkpoint keeps
    optimizer settings there); only the model's own entries are handed to the model.
    """
    sharded = model.sharded_state_dict()
    try:
        state = dist_checkpointing.load(sharded, str(iteration_dir))
    except (Exception, CheckpointException) as error:  # torch's checkpoint errors are BaseExceptions
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise ValueError(damaged_file(iteration_dir) or f"{iteration_dir}: cannot be loaded ({lines[-1]})") from None
    model.load_state_dict({key: state[key] for key in sharded})


def prune(root: str | Path, keep_last: int) -> None:
    """Deletes all but the ``keep_last`` newest iterations; the one ``latest`` names always stays."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, not {keep_last}")
    root = Path(root)
    latest = latest_iteration(root)
    for iteration in list_iterations(root)[:-keep_last]:
        if iteration != latest:
            shutil.rmtree(root / iteration_name(iteration))


def _write_tokenizer(folder: Path, tokenizer) -> None:
    folder.mkdir()
    files = {}
    for name, content in tokenizer_files(tokenizer).items():
        (folder / name).write_bytes(content)
        files[name] = hashlib.sha256(content).hexdigest()
    manifest = {**tokenizer.provenance(), "files": files}
    (folder / TOKENIZER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _replace_dir(staging: Path, final: Path) -> None:
    """Renames ``staging`` to ``final``; an existing ``final`` (the same iteration saved again) is
    moved aside first (to ``.old``, which ``_remove_leftovers`` cleared) and deleted only after the new one
    is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Staging directories of interrupted saves (module docstring); only the writer saves, so none is in use."""
    for path in root.iterdir():
        if path.is_dir() and _LEFTOVER_RE.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _is_writer() -> bool:
    return rank_and_size()[0] == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
