"""Distributed start-up (``platform/distributed.py``): the collective timeout the trainer's
``--distributed-timeout-minutes`` sets.

A rank that is late by more than the timeout must make the waiting rank's collective fail after about the
timeout, in megatron's groups and in the world group (where checkpoint saves wait); were the setting lost,
torch's or megatron's defaults (10 or 30 minutes) would let the collective wait for the late rank and succeed.
"""
import json

from conftest import run_torchrun

TIMEOUT_MINUTES = 0.02  # 1.2 s; the late rank arrives 8 s after the other (tests/workers/distributed_timeout.py)


def test_a_late_rank_fails_the_collectives_after_the_configured_timeout():
    output = run_torchrun("distributed_timeout.py", 2, TIMEOUT_MINUTES, timeout=120).stdout
    line = next(line for line in output.splitlines() if line.startswith("FINDINGS "))
    findings = json.loads(line.removeprefix("FINDINGS "))
    assert set(findings) == {"tensor_parallel_all_reduce", "world_barrier"}
    for name, outcome in findings.items():
        assert outcome["failed"], name
        assert 0.8 * TIMEOUT_MINUTES * 60 < outcome["seconds"] < 6.0, (name, outcome)
