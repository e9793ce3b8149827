"""Decisions at a step boundary: preemption (SIGTERM and SIGUSR1 ask for a checkpoint and a clean exit) and saves
due by the clock.

The handler only records the request; ``StopRequest.agreed()`` all-reduces it (max over every rank) at the
end of a step, together with whether a rank's ``SaveClock`` says a save is due, so all ranks stop or save at the
same iteration even when the signal reached only some of them or their clocks differ.
"""
from __future__ import annotations

import signal
import time

import torch

from megatron_qwen.training.step import device

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.received: str | None = None
        for number in SIGNALS:
            signal.signal(number, self._record)

    def _record(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def agreed(self, save_due: bool) -> tuple[bool, bool]:
        """(stop, save), the same on every rank (one collective): any rank's signal stops them all, and any rank's
        ``save_due`` (its clock, see ``SaveClock``) makes them all save."""
        flags = torch.tensor([1.0 if self.received else 0.0, 1.0 if save_due else 0.0], device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, save = flags.tolist()
        return bool(stop), bool(save)


class SaveClock:
    """``--save-interval-minutes``: a save is due once that long has passed since the last one (or the start), so
    a node lost without warning costs at most that much training."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds
