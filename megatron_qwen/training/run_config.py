"""``SAVE_DIR/run_config.json``: what each start of a run was given, so that the run can be rebuilt from its folder.

Written by global rank 0 once the run has started (its set-up done), atomically (a temporary file renamed over
the old one). The file holds the latest start at its top level:

- ``settings``: every setting, resolved (defaults < recipe < flags) by field name; ``--recipe run_config.json``
  takes them back;
- ``versions`` of megatron_qwen, python, torch, megatron-core and transformers; ``command_line`` (``sys.argv``);
- ``started`` (local time with UTC offset), ``host``, ``world_size``, and where the start began (``start``,
  ``iteration``);

and the earlier starts of the same folder under ``history``, oldest first, each as it was at the top level then
(a run resumed with other settings, a new length, another layout shows there). A file that cannot be read is
replaced, with a warning.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path

from megatron_qwen.config import RUN_CONFIG_SETTINGS, RunConfig
from megatron_qwen.platform.log import timestamp

RUN_CONFIG = "run_config.json"
HISTORY = "history"
PACKAGES = ("megatron-qwen", "torch", "megatron-core", "transformers")


def versions() -> dict[str, str]:
    """Installed versions of the packages a run's results depend on (``None``: not installed as a package)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def start_record(config: RunConfig, start: str, iteration: int, world_size: int) -> dict:
    """What one start of a run records: ``start`` (where it started, in words) at update ``iteration``."""
    return {
        RUN_CONFIG_SETTINGS: config.settings(),
        "versions": versions(),
        "command_line": list(sys.argv),
        "started": timestamp(),
        "host": socket.gethostname(),
        "world_size": world_size,
        "start": start,
        "iteration": iteration,
    }


def write(save_dir: str | Path, record: dict) -> str | None:
    """Writes ``record`` as the latest start into ``save_dir``'s run configuration, the earlier ones kept in its
    history; returns a warning when an earlier file could not be read (it is replaced)."""
    path = Path(save_dir) / RUN_CONFIG
    earlier, warning = [], None
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            earlier = [*previous.pop(HISTORY), previous]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            warning = f"{path}: unreadable ({type(error).__name__}: {error}); replaced, without the earlier starts"
    temporary = path.with_name(f"{RUN_CONFIG}.tmp")
    temporary.write_text(json.dumps({**record, HISTORY: earlier}, indent=1) + "\n")
    os.replace(temporary, path)
    return warning
