"""Distributed start-up (``platform/distributed.py``): the collective timeout the trainer's
``--distributed-timeout-minutes`` sets, and the port a single process or a launcher's rendezvous takes.

A rank that is late by more than the timeout must make the waiting rank's collective fail after about the
timeout, in megatron's groups and in the world group (where checkpoint saves wait); were the setting lost,
torch's or megatron's defaults (10 or 30 minutes) would keep it waiting until the late rank left.
"""
import json
import os
import random
import socket

import pytest

from workers import run_torchrun
from megatron_qwen.platform.distributed import free_port

TIMEOUT_MINUTES = 0.05  # 3 s; the late rank stays away 12 s (tests/workers/distributed_timeout.py)


@pytest.mark.slow
def test_a_late_rank_fails_the_collectives_after_the_configured_timeout(tmp_path):
    output = run_torchrun("distributed_timeout.py", 2, TIMEOUT_MINUTES, tmp_path, timeout=120).stdout
    line = next(line for line in output.splitlines() if line.startswith("FINDINGS "))
    findings = json.loads(line.removeprefix("FINDINGS "))
    assert set(findings) == {"tensor_parallel_all_reduce", "world_barrier"}
    for name, outcome in findings.items():
        assert outcome["failed"], name
        assert 0.8 * TIMEOUT_MINUTES * 60 < outcome["seconds"] < 9.0, (name, outcome)


def test_free_ports_are_bindable_below_the_ephemeral_range_and_leave_the_seeded_generator_alone():
    random.seed(7)
    expected = random.random()
    random.seed(7)
    ports = [free_port() for _ in range(20)]
    assert random.random() == expected
    assert all(20000 <= port < 32768 for port in ports) and len(set(ports)) > 1
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_a_single_process_takes_back_the_rendezvous_address_it_filled_in(monkeypatch):
    # a process that goes on after a run (tests, tools) must not hand its port to the processes it starts later
    from megatron_qwen.platform import distributed

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as a launcher sets it: left alone
    for launcher_var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(launcher_var, raising=False)
    distributed.initialize(seed=1)
    try:
        assert "MASTER_PORT" in os.environ
    finally:
        distributed.destroy()
    assert "MASTER_PORT" not in os.environ
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
