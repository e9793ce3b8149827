"""Distributed start-up (``platform/distributed.py``): the collective timeout the trainer's
``--distributed-timeout-minutes`` sets.

A rank that is late by more than the timeout must make the waiting rank's collective fail after about the
timeout, in megatron's groups and in the world group (where checkpoint saves wait); were the setting lost,
torch's or megatron's defaults (10 or 30 minutes) would keep it waiting until the late rank left.
"""
import json

from conftest import run_torchrun

TIMEOUT_MINUTES = 0.05  # 3 s; the late rank stays away 12 s (tests/workers/distributed_timeout.py)


def test_a_late_rank_fails_the_collectives_after_the_configured_timeout(tmp_path):
    output = run_torchrun("distributed_timeout.py", 2, TIMEOUT_MINUTES, tmp_path, timeout=120).stdout
    line = next(line for line in output.splitlines() if line.startswith("FINDINGS "))
    findings = json.loads(line.removeprefix("FINDINGS "))
    assert set(findings) == {"tensor_parallel_all_reduce", "world_barrier"}
    for name, outcome in findings.items():
        assert outcome["failed"], name
        assert 0.8 * TIMEOUT_MINUTES * 60 < outcome["seconds"] < 9.0, (name, outcome)
