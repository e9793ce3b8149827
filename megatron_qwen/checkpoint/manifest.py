"""The file manifest of an iteration directory: every file's size and sha256, so that damaged, missing or foreign
files are found before an iteration is used.

``manifest.json`` is written last into the staging folder (``layout.save_iteration``), after every other file,
and lists them all (the ``.distcp`` shards, ``.metadata``, ``common.pt``, ``metadata.json``, ``model_config.json``,
the tokenizer folder, the trainer's files). Each ``.distcp`` shard is hashed by the rank whose writer wrote it
(megatron-core names them ``__RANK_N.distcp``), right after ``dist_checkpointing.save`` returns, while its pages
are still in the page cache, and the digests are gathered to rank 0. Hooking megatron's writer instead would hash
the bytes before they reach the file (not what was stored) and tie us to the internals of its forked writer
processes; reading back from the page cache costs the hash alone. Rank 0 hashes the files it writes itself.

``verify`` checks an iteration before it is used: the listed files against the directory (missing, unexpected,
wrong size: a listing and a ``stat`` each), then the digests of one share of the files per rank (shares balanced
by size), hashed on several threads (hashlib releases the GIL), so a large iteration is not read by one process.
An iteration without a manifest (written before manifests existed) is not refused: ``verify`` returns a warning.

sha256 because it is hardware-accelerated on current x86 CPUs (speeds in docs/performance.md); the cost is spread
over the ranks that save or verify.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_qwen.platform import distributed

MANIFEST = "manifest.json"
FORMAT = "megatron-qwen-iteration-manifest/1"
_BLOCK = 8 << 20


class ManifestError(ValueError):
    """An iteration whose files do not match its manifest (or whose manifest is unreadable)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def hashing_threads() -> int:
    """Threads per process: the cores of this node shared by the ranks on it (torchrun's LOCAL_WORLD_SIZE)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // max(local_ranks, 1)))


def describe(folder: Path, names: list[str], threads: int | None = None) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` for files of ``folder`` (names relative to it)."""
    with ThreadPoolExecutor(threads or hashing_threads()) as pool:
        digests = list(pool.map(lambda name: sha256_file(folder / name), names))
    return {name: {"size": (folder / name).stat().st_size, "sha256": digest} for name, digest in zip(names, digests)}


def own_shards(staging: Path, rank: int) -> list[str]:
    """The ``.distcp`` files this global rank's writer produced."""
    return sorted(path.name for path in staging.glob(f"__{rank}_*.distcp"))


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as relative POSIX names."""
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(name for name in names if name != MANIFEST)


def write(staging: Path, described: dict[str, dict]) -> None:
    """Writes the manifest of ``staging``: ``described`` (the other ranks' shards) plus every file not in it, hashed
    here; called last, once every other file of the iteration is written."""
    rest = [name for name in files_in(staging) if name not in described]
    files = {**described, **describe(staging, rest)}
    text = json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=1) + "\n"
    temporary = staging / f"{MANIFEST}.tmp"
    temporary.write_text(text)
    os.replace(temporary, staging / MANIFEST)


def verify(iteration_dir: Path, rank: int = 0, world_size: int = 1, threads: int | None = None) -> str | None:
    """Checks ``iteration_dir`` against its manifest: all files present, none unexpected, sizes as listed, and the
    digests of this rank's share (``world_size`` shares). Raises ``ManifestError`` naming the file; returns a
    warning for an iteration written before manifests existed, else None."""
    listed = read(iteration_dir)
    if listed is None:
        return (f"{iteration_dir}: no {MANIFEST} (written before iterations recorded their files' digests); "
                "its files cannot be verified")
    present = set(files_in(iteration_dir))
    for name in sorted(set(listed) - present):
        raise ManifestError(f"{iteration_dir / name}: missing (listed in {iteration_dir / MANIFEST})")
    for name in sorted(present - set(listed)):
        raise ManifestError(f"{iteration_dir / name}: unexpected file, not listed in {iteration_dir / MANIFEST} "
                            "(a leftover of another save, or copied in)")
    for name, recorded in listed.items():
        size = (iteration_dir / name).stat().st_size
        if size != recorded["size"]:
            raise ManifestError(f"{iteration_dir / name}: {size} bytes, but {recorded['size']} when it was written "
                                "(truncated or overwritten)")
    mine = share(listed, rank, world_size)
    for name, found in describe(iteration_dir, mine, threads).items():
        if found["sha256"] != listed[name]["sha256"]:
            raise ManifestError(f"{iteration_dir / name}: sha256 differs from the one recorded when it was written "
                                "(the file's bytes were changed)")
    return None


def verify_on_all_ranks(iteration_dir: Path) -> str | None:
    """``verify`` split over the ranks of ``torch.distributed`` when it is initialized (a collective: every rank
    calls it): each rank checks its share, and every rank raises the first problem any rank found."""
    rank, world_size = distributed.rank_and_size()
    problem, warning = None, None
    try:
        warning = verify(Path(iteration_dir), rank, world_size)
    except (ManifestError, OSError) as error:  # OSError: a file that cannot be read
        problem = str(error)
    found = [problem for problem in distributed.all_gathered(problem) if problem]
    if found:
        raise ManifestError(found[0])
    return warning


def read(iteration_dir: Path) -> dict[str, dict] | None:
    """The manifest's files (None when the iteration has no manifest)."""
    path = iteration_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(entry["size"], int) and isinstance(entry["sha256"], str) for entry in files.values()):
            raise TypeError("an entry without an integer size and a sha256")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    return files


def share(files: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """This rank's files: the largest first, each to the rank with the fewest bytes so far (the same on every rank)."""
    loads = [0] * world_size
    mine = []
    for name in sorted(files, key=lambda name: (-files[name]["size"], name)):
        least = loads.index(min(loads))
        loads[least] += files[name]["size"]
        if least == rank:
            mine.append(name)
    return mine
