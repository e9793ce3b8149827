"""Paths a run writes: whether a folder can exist (a setting that names a file, or a folder under one, is refused
before any work instead of failing at the first write, minutes or hours later), and the mode of written files."""
from __future__ import annotations

import os
from pathlib import Path


def folder_problem(folder: str | Path | None) -> str | None:
    """Why ``folder`` cannot be or become a folder (it, or the nearest of its parents that exists, is a file);
    ``None`` when it can, or is ``None``."""
    if folder is None:
        return None
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return f"{existing} is a file, not a folder" if existing.exists() and not existing.is_dir() else None


def give_created_file_mode(path: str | Path) -> None:
    """Gives ``path`` the mode of a file this process creates with ``open`` (0666 less the umask): for a file that a
    library wrote through a private temporary file (safetensors' ``save_file``: mode 0600, which a serving account
    on a shared cluster could not read)."""
    umask = os.umask(0o022)  # reading the mask means setting it; put back at once (the export is single-threaded)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
