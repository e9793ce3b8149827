"""Preemption: SIGTERM and SIGUSR1 ask for a checkpoint at the next step boundary and a clean exit.

The handler only records the request; ``StopRequest.agreed()`` all-reduces it (max over every rank) at the
end of a step, so all ranks save at the same iteration even when the signal reached only some of them.
"""
from __future__ import annotations

import signal

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        for number in SIGNALS:
            signal.signal(number, self._record)

    def _record(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def agreed(self) -> bool:
        """True on every rank when any rank received a signal (collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
