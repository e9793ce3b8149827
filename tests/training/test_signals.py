"""The trainer under a bare torchrun on 2 CPU processes, signalled from outside the way clusters signal jobs: to
whole process groups (slurmstepd does; torchrun passes SIGTERM on to each worker's group with ``os.killpg``),
during training and during a save, which megatron-core's checkpoint writer processes take part in.

Three launches of ``torchrun -m megatron_qwen.train``, each in a session of its own, as a batch script's, with the
writer processes slowed (``MEGATRON_QWEN_SLOW_WRITES``) so that each save lasts long enough to be signalled in:

- the reference, uninterrupted: at its last save a worker gets SIGKILL, and 10 s later no process of the launch
  (torchrun, its workers, their writer processes) is left;
- part 1: SIGUSR1 to each worker's process group after an update, then, during the save that follows, SIGTERM to
  torchrun's process group;
- part 2, resuming part 1: SIGTERM to torchrun's process group after an update, then SIGUSR1 and SIGTERM to each
  worker's process group during the save.

Both parts save and stop, and their updates are the reference's bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workers import REPO, run_python, worker_env
from workers.trainer_common import fixture_dir, run_args, step_records, updates_logged

from megatron_qwen.checkpoint import layout
from megatron_qwen.platform.faults import SLOW_WRITES

pytestmark = pytest.mark.slow  # torchrun launches of the trainer, signalled

STEPS = 8  # more than the parts can reach, however late a signal lands
WRITE_SECONDS = 2


class Launch:
    """``torchrun --nproc-per-node 2 -m megatron_qwen.train`` in a session of its own, saving into ``save_dir``."""

    def __init__(self, output: Path, data: Path, save_dir: Path):
        self.output, self.save_dir = output, save_dir
        flags = run_args(
            str(data / "plain"), str(data / "start"), str(save_dir), rows="padfree", micro_batch_size=2,
            distributed_optimizer=True, dropout=0.1, train_steps=STEPS,
        )
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "megatron_qwen.train", *flags]
        with open(f"{output}.out", "w") as stdout, open(f"{output}.err", "w") as stderr:
            self.torchrun = subprocess.Popen(
                command, cwd=REPO, env={**worker_env(), SLOW_WRITES: str(WRITE_SECONDS)}, stdout=stdout,
                stderr=stderr, start_new_session=True,
            )

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + 180
        while not condition():
            if self.torchrun.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.output.name}: ended or timed out before {what}\n{self.stderr()[-4000:]}")
            time.sleep(0.05)

    def updates_after(self, count: int) -> None:
        self.wait_until(lambda: updates_logged(self.save_dir) > count, f"update {count + 1}")

    def saving(self) -> None:
        """Waits until a save has begun writing: every worker has forked megatron-core's writer processes."""
        self.wait_until(lambda: any(self.save_dir.glob("iter_*.partial")), "a save")
        self.wait_until(lambda: all(worker.children() for worker in self.workers()), "the writers' start")

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.torchrun.pid).children()

    def signal_workers(self, *numbers: signal.Signals) -> None:
        """Each signal to each worker's process group (torchrun starts every worker in a session of its own)."""
        for number in numbers:
            for worker in self.workers():
                os.killpg(worker.pid, number)

    def signal_torchrun(self, number: signal.Signals) -> None:
        os.killpg(self.torchrun.pid, number)

    def ended(self) -> None:
        try:
            self.torchrun.wait(timeout=120)
        finally:
            self.kill()
        self.saved = layout.latest_iteration(self.save_dir)

    def kill(self) -> None:
        """Whatever is left of the launch (nothing, when it ended as it should)."""
        left = alive(self.descendants())
        if self.torchrun.poll() is None:
            self.torchrun.kill()
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.torchrun.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stdout(self) -> str:
        return Path(f"{self.output}.out").read_text()

    def stderr(self) -> str:
        return Path(f"{self.output}.err").read_text()


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(process):
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [process for process in processes if running(process)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return fixture_dir(tmp_path_factory, run_python), tmp_path_factory.mktemp("signals")


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted launch, its last save cut short by a SIGKILL of a worker: what of it was left 10 s later."""
    data, work = work
    reference = Launch(work / "reference", data, work / "reference")
    reference.wait_until(lambda: updates_logged(work / "reference") == STEPS, "its last update")
    reference.saving()
    run = [psutil.Process(reference.torchrun.pid), *reference.descendants()]
    os.kill(reference.workers()[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while alive(run) and time.monotonic() < killed_at + 10:
        reference.torchrun.poll()  # torchrun is this process's child: reaped here
        time.sleep(0.1)
    left = [f"{process.pid} {process.cmdline()}" for process in alive(run)]
    reference.kill()
    return left


@pytest.fixture(scope="module")
def interrupted(work):
    """The two parts of the interrupted run (module docstring)."""
    data, work = work
    part1 = Launch(work / "part1", data, work / "interrupted")
    part1.updates_after(0)
    part1.signal_workers(signal.SIGUSR1)
    part1.saving()
    part1.signal_torchrun(signal.SIGTERM)
    part1.ended()
    if part1.saved is None:
        pytest.fail(f"part 1 saved nothing\n{part1.stderr()[-4000:]}")
    part2 = Launch(work / "part2", data, work / "interrupted")
    part2.updates_after(part1.saved)
    part2.signal_torchrun(signal.SIGTERM)
    part2.saving()
    part2.signal_workers(signal.SIGUSR1, signal.SIGTERM)
    part2.ended()
    return {"part1": part1, "part2": part2}


def test_no_process_of_a_launch_outlives_a_killed_worker_by_10_s(reference):
    assert reference == []


@pytest.mark.parametrize("part, first_signal", [("part1", "SIGUSR1"), ("part2", "SIGTERM")])
def test_signals_to_whole_process_groups_during_training_and_a_save_save_and_stop(interrupted, part, first_signal):
    launch = interrupted[part]
    assert 0 < launch.saved < STEPS
    assert f"stopped by {first_signal} at iteration {launch.saved} after saving" in launch.stdout(), \
        launch.stderr()[-4000:]
    assert "train: error" not in launch.stderr()


def test_the_interrupted_run_resumes_bit_exact(work, reference, interrupted):
    _, work = work
    updates, uninterrupted = step_records(work / "interrupted"), step_records(work / "reference")
    stopped_at = interrupted["part2"].saved
    assert interrupted["part1"].saved < stopped_at
    assert [r["iteration"] for r in updates] == list(range(1, stopped_at + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in updates] == [r[key] for r in uninterrupted[:stopped_at]], key
