"""One writer per save directory (training/save_dir_lock.py), in this process: a lock left by the same SLURM job (a
requeue), by a process gone from this host, or with a heartbeat minutes old is taken over and named; a live holder
stops the second run with a message naming it; the lock goes at release. The refusal inside a trainer's start is
tested with the resumes (training/test_resume.py).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_qwen.training import save_dir_lock
from megatron_qwen.training.checkpointing import CheckpointError

HOST = socket.gethostname()


def hold(directory, host=HOST, pid=None, job=None, age=0.0):
    """A lock file as another run's would be: ``age`` seconds since its heartbeat."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": os.getppid() if pid is None else pid, "job": job, "heartbeat": time.time() - age}
    (directory / save_dir_lock.LOCK_FILE).write_text(json.dumps(record))


def holder(directory):
    return json.loads((directory / save_dir_lock.LOCK_FILE).read_text())


def ended_process() -> int:
    """The PID of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(autouse=True)
def no_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_a_free_directory_is_taken_and_released(tmp_path):
    lock = save_dir_lock.take(str(tmp_path / "save"))
    try:
        assert (holder(tmp_path / "save")["host"], holder(tmp_path / "save")["pid"]) == (HOST, os.getpid())
        assert lock.taken_over is None
    finally:
        lock.release()
    assert not (tmp_path / "save").exists()  # created for the lock, left empty: gone with it


def test_a_live_holder_stops_the_second_run_with_a_message_naming_it(tmp_path):
    hold(tmp_path, job="1234", age=42)
    with pytest.raises(CheckpointError) as refused:
        save_dir_lock.take(str(tmp_path))
    assert f"--save-dir {tmp_path} is in use by another run (host {HOST}, pid {os.getppid()}, SLURM job 1234, " \
        f"heartbeat 42 s ago; {tmp_path / 'writer.lock'})" in str(refused.value)
    assert holder(tmp_path)["pid"] == os.getppid()  # left as it was


def test_a_holder_on_another_host_is_trusted_while_its_heartbeat_is_recent(tmp_path):
    hold(tmp_path, host="elsewhere", pid=ended_process())
    with pytest.raises(CheckpointError, match="host elsewhere"):
        save_dir_lock.take(str(tmp_path))


@pytest.mark.parametrize("lock, environment, reason", [
    ({"job": "77"}, {"SLURM_JOB_ID": "77"}, "it is this SLURM job's (77), from before a requeue"),
    ({"pid": "dead"}, {}, "is no longer running on this host"),
    ({"host": "elsewhere", "age": save_dir_lock.STALE_SECONDS + 60}, {}, "its heartbeat is over 300 s old"),
])
def test_a_lock_left_behind_is_taken_over_and_named(tmp_path, monkeypatch, lock, environment, reason):
    if lock.get("pid") == "dead":
        lock = {"pid": ended_process()}
    hold(tmp_path, **lock)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    taken = save_dir_lock.take(str(tmp_path))
    try:
        assert taken.taken_over.startswith(f"took over {tmp_path / 'writer.lock'} from host ")
        assert reason in taken.taken_over
        assert holder(tmp_path)["pid"] == os.getpid()
    finally:
        taken.release()
    assert not (tmp_path / save_dir_lock.LOCK_FILE).exists()
    assert tmp_path.is_dir()  # the directory was there before
