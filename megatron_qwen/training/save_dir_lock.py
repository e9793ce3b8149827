"""One writer per save directory: the lock a run takes on its ``--save-dir`` at start and holds until it closes.

Two runs writing one directory would resume from each other's unfinished saves, delete each other's staging
folders (every save clears ``.partial`` leftovers, ``checkpoint/layout.py``) and overwrite each other's
iterations. The lock is the file ``writer.lock`` there: the holder's host, PID, SLURM job id (if any) and a
heartbeat time that a daemon thread refreshes every ``HEARTBEAT_SECONDS``. A run that finds it held takes it over,
and says so in its log, when the holder is the same SLURM job (a requeued job: its earlier run is gone), a process
no longer alive on this host, or silent for over ``STALE_SECONDS``; otherwise it stops at once with a message
naming the holder. Global rank 0 takes and holds it; the other ranks learn the outcome in one collective.

A record is written to a temporary file first, so that a lock file is always whole; it takes a free lock by a hard
link (which fails when a lock is there: of two runs starting at once, one gets it) and a lock it may take over by a
rename, read back afterwards (two runs taking over one abandoned lock within the same few milliseconds could both
read back their own record; no lock server, no guarantee there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from megatron_qwen.training.checkpointing import CheckpointError

LOCK_FILE = "writer.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None  # SLURM_JOB_ID
    heartbeat: float  # time.time() of the last refresh

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), time.time())

    def is_process_of(self, other: Holder) -> bool:
        return (self.host, self.pid) == (other.host, other.pid)

    def describe(self, now: float) -> str:
        job = f"SLURM job {self.job}" if self.job else "no SLURM job"
        return f"host {self.host}, pid {self.pid}, {job}, heartbeat {now - self.heartbeat:.0f} s ago"


def takeover_reason(holder: Holder, me: Holder, now: float) -> str | None:
    """Why ``me`` may take over the lock ``holder`` holds; None when the holder may still be writing."""
    if holder.job is not None and holder.job == me.job:
        return f"it is this SLURM job's ({holder.job}), from before a requeue"
    if holder.host == me.host and not _alive(holder.pid):
        return f"its process {holder.pid} is no longer running on this host"
    if now - holder.heartbeat > STALE_SECONDS:
        return f"its heartbeat is over {STALE_SECONDS:.0f} s old"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SaveDirLock:
    """The lock held by this process (global rank 0), with its heartbeat thread; ``taken_over`` names the holder
    it replaced, if any, for the log. A directory the lock created is removed with it when nothing else was
    written there (a run that failed at start leaves no trace)."""

    def __init__(self, path: Path, me: Holder, taken_over: str | None, created_directory: bool):
        self.path, self.me, self.taken_over = path, me, taken_over
        self.created_directory = created_directory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="save-dir-lock heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if not _holds(self.path, self.me):
                print(f"warning: {self.path} was taken over by another run", file=sys.stderr, flush=True)
                return
            _write_record(self.path, dataclasses.replace(self.me, heartbeat=time.time()))

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if _holds(self.path, self.me):
            self.path.unlink()
        if self.created_directory:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.path.parent.rmdir()


def take(save_dir: str | None) -> SaveDirLock | None:
    """Takes the lock of ``save_dir`` (collective; the lock on global rank 0, None elsewhere and without a save
    directory); raises ``CheckpointError`` on every rank when another run holds it or it cannot be written."""
    if save_dir is None:
        return None
    lock, problem = None, None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            lock = _take(Path(save_dir))
        except CheckpointError as error:
            problem = str(error)
        except OSError as error:
            problem = f"--save-dir {save_dir}: cannot write its lock ({error})"
    outcome = [problem]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return lock


def _take(directory: Path) -> SaveDirLock:
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path, me = directory / LOCK_FILE, Holder.this_process()
    temporary = _write_temporary(path, me)
    try:
        os.link(temporary, path)
        return SaveDirLock(path, me, None, created)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    holder = _read(path)
    if holder is None and path.exists():
        raise CheckpointError(f"{path}: unreadable; delete it if no run writes to {directory}")
    reason = None if holder is None else takeover_reason(holder, me, time.time())
    if holder is not None and reason is None:
        raise CheckpointError(
            f"--save-dir {directory} is in use by another run ({holder.describe(time.time())}; {path}); wait for "
            f"it to end or use another directory (a lock whose heartbeat is over {STALE_SECONDS:.0f} s old, or "
            "whose process is gone, is taken over)"
        )
    _write_record(path, me)
    if not _holds(path, me):
        raise CheckpointError(f"--save-dir {directory}: another run took over {path} at the same moment")
    note = None if holder is None else f"took over {path} from {holder.describe(time.time())}: {reason}"
    return SaveDirLock(path, me, note, created_directory=False)


def _holds(path: Path, me: Holder) -> bool:
    holder = _read(path)
    return holder is not None and holder.is_process_of(me)


def _write_temporary(path: Path, holder: Holder) -> Path:
    temporary = path.with_name(f"{path.name}.{holder.host}.{holder.pid}.tmp")
    temporary.write_text(json.dumps(dataclasses.asdict(holder)) + "\n")
    return temporary


def _write_record(path: Path, holder: Holder) -> None:
    os.replace(_write_temporary(path, holder), path)


def _read(path: Path) -> Holder | None:
    """The record at ``path``; None when there is none or it is not one."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
