"""Whether a folder that a run writes into can exist: a setting that names a file, or a folder under one, is
refused before any work instead of failing at the first write, minutes or hours later."""
from __future__ import annotations

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
