"""Fault injection for the tests of the trainer's failure paths, switched on by environment variables.

- ``MEGATRON_QWEN_NAN_AT_ITERATION=K``: the loss of update ``K`` becomes NaN (through its gradients too).
- ``MEGATRON_QWEN_SIGTERM_AT_ITERATION=K``: global rank 0 sends itself SIGTERM after update ``K``, as a
  scheduler's preemption would (only one rank receives it, which also exercises the all-reduced decision);
  ``K`` equal to the iteration the run starts at sends it at the end of the trainer's start-up.
- ``MEGATRON_QWEN_SLOW_WRITES=SECONDS``: each of megatron-core's checkpoint writer processes waits that long before
  it writes (a slow file system), so that a test can signal a run while it saves.
"""
from __future__ import annotations

import os
import signal
import time

import torch

NAN_AT = "MEGATRON_QWEN_NAN_AT_ITERATION"
SIGTERM_AT = "MEGATRON_QWEN_SIGTERM_AT_ITERATION"
SLOW_WRITES = "MEGATRON_QWEN_SLOW_WRITES"


def _iteration_from(variable: str) -> int | None:
    value = os.environ.get(variable)
    return int(value) if value else None


def poison_loss(per_token_loss: torch.Tensor, iteration: int) -> torch.Tensor:
    """``per_token_loss``, made NaN when ``iteration`` is the one ``NAN_AT`` names."""
    if _iteration_from(NAN_AT) == iteration:
        return per_token_loss * float("nan")
    return per_token_loss


def maybe_signal(iteration: int) -> None:
    if _iteration_from(SIGTERM_AT) == iteration and torch.distributed.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGTERM)


def slow_writes() -> None:
    time.sleep(float(os.environ.get(SLOW_WRITES) or 0))
