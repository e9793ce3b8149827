"""Decisions at a step boundary: preemption (SIGTERM and SIGUSR1 ask for a checkpoint and a clean exit) and saves
due by the clock.

The handler only records the request; ``StopRequest.agreed()`` all-reduces it (max over every rank) at the
end of a step, together with whether a rank's ``SaveClock`` says a save is due, so all ranks stop or save at the
same iteration even when the signal reached only some of them or their clocks differ.

Importing this module imports nothing heavy: the trainer's entry point installs the handlers before torch and
megatron-core import.
"""
from __future__ import annotations

import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.received: str | None = None
        self.previous = {number: signal.signal(number, self._record) for number in SIGNALS}

    def release(self) -> None:
        """Puts back the handlers there were before: a process that goes on after the run (tests, the benchmark)
        must not keep recording signals for it, nor pass that on to the processes it forks (which a SIGTERM
        would then no longer end)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _record(self, number, frame) -> None:
        # the first one names the stop: a launcher may pass on another while the run saves
        self.received = self.received or signal.Signals(number).name

    @property
    def reason(self) -> str:
        """Why the run stops: this rank's signal, or another rank's."""
        return self.received or "signal on another rank"

    def agreed(self, save_due: bool) -> tuple[bool, bool]:
        """(stop, save), the same on every rank (one collective): any rank's signal stops them all, and any rank's
        ``save_due`` (its clock, see ``SaveClock``) makes them all save."""
        from megatron_qwen.platform.distributed import on_any_rank  # imports torch: see the module's docstring

        return on_any_rank(self.received is not None, save_due)


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
