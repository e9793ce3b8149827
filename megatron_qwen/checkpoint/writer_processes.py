"""megatron-core's distributed save with the processes it starts bound to the saving process: they survive the
signals a scheduler sends to its whole process group, and die with it.

megatron-core 0.16's filesystem writer (``dist_checkpointing/strategies/filesystem_async.py``) starts two kinds:

- at a process's first save, a spawn-context multiprocessing Manager (~310 MB) whose queue carries the writes'
  results back. It runs in the saver's process group with default signal handling, so a preemption signal sent to
  the group (slurmstepd does, and torchrun forwards SIGTERM with ``os.killpg``) kills it and the save after that
  fails ("Broken pipe"); a SIGKILLed saver leaves it running. Our saves are synchronous (the results are read by
  the process that wrote them), so the queue here is an in-process one and no Manager is started.
- at every save, forked writer processes (two per rank) that write the shards. Here they ignore SIGTERM, SIGUSR1
  and SIGINT (the saver decides when to stop; megatron-core's writer would not report a writer killed by one and
  the saver would wait for it forever) and get SIGKILL when the saver dies (``PR_SET_PDEATHSIG``): a killed rank's
  writers would otherwise stay, and hang when the results they send fill the pipe no one reads any more.

Only children forked during ``save`` are bound; the hooks leave every other fork of the process alone.
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_qwen.platform import faults

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# looked up here, not in a forked child, where the dynamic loader's lock may be held by a thread that is not there
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_IGNORED_IN_WRITERS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_saver_pid: int | None = None  # while this process saves: its pid, which the writers it forks are bound to


def save(sharded_state_dict: dict, folder: Path) -> None:
    """``dist_checkpointing.save`` of ``sharded_state_dict`` into ``folder`` (collective; synchronous)."""
    global _saver_pid
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()  # in place of the Manager's (module docstring)
    _saver_pid = os.getpid()
    try:
        dist_checkpointing.save(sharded_state_dict, str(folder))
    finally:
        _saver_pid = None


def _bind_forked_writer() -> None:
    """In a child forked during ``save``: ignore the stop signals, die with the saver."""
    if _saver_pid is None:
        return
    for number in _IGNORED_IN_WRITERS:
        signal.signal(number, signal.SIG_IGN)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != _saver_pid:  # the saver died before the line above took effect
            os._exit(1)
    faults.slow_writes()


os.register_at_fork(after_in_child=_bind_forked_writer)
