"""``examples/sft_qwen_14b.sh``, the users' entry point, run as they run it, on 2 CPU processes.

Under torchrun (one node): a SIGTERM to the script, as a pod's termination notice sends it, makes the trainers save
at the end of their update and the script exit 0. (torchrun left to itself would kill them 30 seconds after
passing the signal on, and exit 1 with a traceback even when they saved in time.) Then under SLURM, with
stand-ins for ``srun`` and ``scontrol`` (no cluster here): the batch script resumes from that checkpoint, passes
the time-limit warning (SIGUSR1) on to its tasks, which save, and requeues the job.
Both runs override the 14B recipe with ``--recipe``: the fixtures' tiny model, fp32, 32-token rows.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, _worker_env, run_python
from workers.trainer_common import VOCAB, fixture_dir, step_records

from megatron_qwen.checkpoint import layout
from megatron_qwen.platform.distributed import free_port

SRUN = """#!/usr/bin/env bash
# srun on one host: SLURM_NTASKS tasks of the command, SIGUSR1 passed on to them, the first failure's status
while [[ $1 == -* ]]; do shift; done
tasks=()
trap 'kill -USR1 "${tasks[@]}" 2>/dev/null || true' USR1
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_STEP_ID=0 SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  tasks+=($!)
done
status=0
for task in "${tasks[@]}"; do
  while kill -0 "$task" 2>/dev/null; do wait "$task" || true; done
  wait "$task" || { code=$?; [[ $status != 0 ]] || status=$code; }
done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SCONTROL_LOG"
"""


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("launch")
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({
        "precision": "fp32", "seq_length": 32, "rows": "padfree", "valid_fraction": 0.0, "global_batch_size": 8,
        "train_steps": 1000, "warmup_steps": 1, "lr": 1e-3, "dropout": 0.0, "eval_interval": 0, "log_interval": 1,
        "save_interval": 1000, "pad_token_id": VOCAB - 1,
    }))
    standins = work / "bin"
    standins.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (standins / name).write_text(text)
        (standins / name).chmod(0o755)
    env = {
        **_worker_env(), "DATA": str(data / "plain"), "PRETRAINED": str(data / "start"), "SAVE_DIR": str(work / "save"),
        "PYTHON": sys.executable, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    torchrun = launch(work / "torchrun", {**env, "GPUS_PER_NODE": "2"}, signal.SIGTERM, recipe)
    slurm = {
        **env, "PATH": f"{standins}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
        "SLURM_NODELIST": "localhost", "MASTER_PORT": str(free_port()), "SCONTROL_LOG": str(work / "scontrol.log"),
    }
    return torchrun, launch(work / "slurm", slurm, signal.SIGUSR1, recipe), work


def launch(output: Path, env: dict, stop_signal: signal.Signals, recipe: Path) -> dict:
    """Runs the script until its trainers have logged an update, sends it ``stop_signal``, and returns how it
    ended, its output, and the iterations its updates took."""
    metrics = Path(env["SAVE_DIR"]) / "tensorboard" / "metrics.jsonl"
    before = len(step_records(env["SAVE_DIR"])) if metrics.exists() else 0
    with open(f"{output}.out", "w") as stdout, open(f"{output}.err", "w") as stderr:
        script = subprocess.Popen(
            ["bash", "examples/sft_qwen_14b.sh", "--recipe", str(recipe)], cwd=REPO, env=env, stdout=stdout,
            stderr=stderr, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not (metrics.exists() and len(step_records(env["SAVE_DIR"])) > before):
                assert script.poll() is None and time.monotonic() < deadline, Path(f"{output}.err").read_text()[-4000:]
                time.sleep(0.2)
            script.send_signal(stop_signal)
            returncode = script.wait(timeout=240)
        finally:
            if script.poll() is None:
                os.killpg(script.pid, signal.SIGKILL)
    iterations = [record["iteration"] for record in step_records(env["SAVE_DIR"])[before:]]
    return {
        "returncode": returncode, "stdout": Path(f"{output}.out").read_text(),
        "stderr": Path(f"{output}.err").read_text(), "iterations": iterations,
    }


def test_sigterm_to_the_script_under_torchrun_saves_and_exits_0(launches):
    torchrun, _, work = launches
    assert torchrun["returncode"] == 0, torchrun["stderr"][-4000:]
    stopped_at = torchrun["iterations"][-1]
    assert torchrun["iterations"] == list(range(1, stopped_at + 1))
    assert layout.list_iterations(work / "save")[0] == stopped_at
    assert f"stopped by SIGUSR1 at iteration {stopped_at} after saving" in torchrun["stdout"]
    assert "SignalException" not in torchrun["stderr"]


def test_slurm_batch_script_resumes_saves_on_the_time_limit_warning_and_requeues(launches):
    torchrun, slurm, work = launches
    assert slurm["returncode"] == 0, slurm["stderr"][-4000:]
    resumed_from, stopped_at = torchrun["iterations"][-1], slurm["iterations"][-1]
    assert slurm["iterations"] == list(range(resumed_from + 1, stopped_at + 1))
    assert layout.list_iterations(work / "save") == [resumed_from, stopped_at]
    assert f"stopped by SIGUSR1 at iteration {stopped_at} after saving" in slurm["stdout"]
    assert "requeueing job 4242" in slurm["stdout"]
    assert (work / "scontrol.log").read_text() == "requeue 4242\n"
