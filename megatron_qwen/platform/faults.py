"""Fault injection for the tests of the trainer's failure paths, switched on by environment variables.

- ``MEGATRON_QWEN_NAN_AT_ITERATION=K``: the loss of update ``K`` becomes NaN (through its gradients too).
- ``MEGATRON_QWEN_SIGTERM_AT_ITERATION=K``: global rank 0 sends itself SIGTERM after update ``K``, as a
  scheduler's preemption would (only one rank receives it, which also exercises the all-reduced decision);
  ``K`` equal to the iteration the run starts at sends it at the end of the trainer's start-up.
- ``MEGATRON_QWEN_SLOW_WRITES=SECONDS``: each of megatron-core's checkpoint writer processes waits that long before
  it writes (a slow file system), so that a test can signal a run while it saves.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def nan_loss_at(iteration: int, chunks: list):
    """While update ``iteration`` runs: when ``NAN_AT`` names it, every loss-computing model chunk's output (the
    per-token losses) becomes NaN, and so do the gradients behind it."""
    hooks = []
    if _iteration_from(NAN_AT) == iteration:
        hooks = [chunk.module.register_forward_hook(lambda module, inputs, output: output * float("nan"))
                 for chunk in chunks if chunk.module.post_process]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def maybe_signal(iteration: int) -> None:
    if _iteration_from(SIGTERM_AT) == iteration and torch.distributed.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGTERM)


def slow_writes() -> None:
    time.sleep(float(os.environ.get(SLOW_WRITES) or 0))
