"""``examples/sft_qwen_14b.sh``, the users' entry point, run as they run it, on 2 CPU processes.

Under torchrun (one node): a SIGTERM to the script, as a pod's termination notice sends it, makes the trainers save
at the end of their update and the script exit 0. (torchrun left to itself would kill them 30 seconds after
passing the signal on, and exit 1 with a traceback even when they saved in time.) Then under SLURM, with
stand-ins for ``srun`` and ``scontrol`` (no cluster here): the batch script resumes from that checkpoint, passes
the time-limit warning (SIGUSR1) on to its tasks, which save, and requeues the job. And two "nodes" (two
launches of the script, NODE_RANK 0 and 1) join one torchrun job.
All runs override the 14B recipe with ``--recipe``: the fixtures' tiny model, fp32, 32-token rows.
``examples/sft_qwen3_30b_a3b.sh`` (the same launcher) is only started as an srun task would start it, with a
stand-in for the command, whose flags are then parsed: its layout must fit Qwen3-30B-A3B on 16 GPUs.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import REPO, run_python, worker_env
from workers.trainer_common import VOCAB, fixture_dir, step_records, updates_logged

from megatron_qwen.checkpoint import layout
from megatron_qwen.config import parse_config
from megatron_qwen.models.presets import PRESETS
from megatron_qwen.platform.distributed import free_port

pytestmark = pytest.mark.slow  # the launch script under torchrun and a stand-in SLURM

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
def setting(tmp_path_factory):
    """(the environment the script runs in, a recipe file in place of the 14B one, a folder to work in)."""
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("launch")
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({
        "precision": "fp32", "seq_length": 32, "rows": "padfree", "valid_fraction": 0.0, "global_batch_size": 8,
        "train_steps": 1000, "warmup_steps": 1, "lr": 1e-3, "dropout": 0.0, "eval_interval": 0, "log_interval": 1,
        "save_interval": 1000, "pad_token_id": VOCAB - 1,
    }))
    # the checkout's command (this environment's megatron-qwen script may belong to another installation)
    command = work / "megatron-qwen"
    command.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m megatron_qwen "$@"\n')
    command.chmod(0o755)
    env = {
        **worker_env(), "DATA": str(data / "plain"), "PRETRAINED": str(data / "start"), "SAVE_DIR": str(work / "save"),
        "MEGATRON_QWEN": str(command),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    return env, recipe, work


@pytest.fixture(scope="module")
def launches(setting):
    """How the torchrun launch stopped by SIGTERM ended, and then the SLURM one that resumed its checkpoint."""
    env, recipe, work = setting
    standins = work / "bin"
    standins.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (standins / name).write_text(text)
        (standins / name).chmod(0o755)
    torchrun = launch(work / "torchrun", {**env, "GPUS_PER_NODE": "2"}, signal.SIGTERM, recipe)
    slurm = {
        **env, "PATH": f"{standins}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
        "SLURM_NODELIST": "localhost", "MASTER_PORT": str(free_port()), "SCONTROL_LOG": str(work / "scontrol.log"),
    }
    return torchrun, launch(work / "slurm", slurm, signal.SIGUSR1, recipe)


def start(output: Path, env: dict, *flags: str) -> subprocess.Popen:
    """The script, started with ``flags`` in its own session, its output going to ``output``.out and .err."""
    with open(f"{output}.out", "w") as stdout, open(f"{output}.err", "w") as stderr:
        return subprocess.Popen(
            ["bash", "examples/sft_qwen_14b.sh", *flags], cwd=REPO, env=env, stdout=stdout, stderr=stderr,
            start_new_session=True,
        )


def ended(script: subprocess.Popen, output: Path, save_dir: str, before: int = 0) -> dict:
    """How ``script`` ended: its exit status, its output, and the iterations of the updates it took."""
    try:
        returncode = script.wait(timeout=240)
    finally:
        try:  # whatever of its session is left (nothing, when it ended as it should)
            os.killpg(script.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {
        "returncode": returncode, "stdout": Path(f"{output}.out").read_text(),
        "stderr": Path(f"{output}.err").read_text(),
        "iterations": [record["iteration"] for record in step_records(save_dir)[before:]],
    }


def launch(output: Path, env: dict, stop_signal: signal.Signals, recipe: Path) -> dict:
    """Runs the script until its trainers have logged an update, then sends it ``stop_signal``."""
    before = updates_logged(env["SAVE_DIR"])
    script = start(output, env, "--recipe", str(recipe))
    deadline = time.monotonic() + 240
    while updates_logged(env["SAVE_DIR"]) == before:
        if script.poll() is not None:
            break  # it failed: ended() says how
        if time.monotonic() > deadline:
            os.killpg(script.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    else:
        script.send_signal(stop_signal)
    return ended(script, output, env["SAVE_DIR"], before)


def test_sigterm_to_the_script_under_torchrun_saves_and_exits_0(launches, setting):
    (torchrun, _), (_, _, work) = launches, setting
    assert torchrun["returncode"] == 0, torchrun["stderr"][-4000:]
    stopped_at = torchrun["iterations"][-1]
    assert torchrun["iterations"] == list(range(1, stopped_at + 1))
    assert layout.list_iterations(work / "save")[0] == stopped_at
    assert re.search(rf"iteration {stopped_at} \| saved \S+/iter_{stopped_at:07d} in \d+\.\d s\n", torchrun["stdout"])
    assert f"stopped by SIGUSR1 at iteration {stopped_at} after saving" in torchrun["stdout"]
    assert "SignalException" not in torchrun["stderr"]


def test_slurm_batch_script_resumes_saves_on_the_time_limit_warning_and_requeues(launches, setting):
    (torchrun, slurm), (_, _, work) = launches, setting
    assert slurm["returncode"] == 0, slurm["stderr"][-4000:]
    resumed_from, stopped_at = torchrun["iterations"][-1], slurm["iterations"][-1]
    assert slurm["iterations"] == list(range(resumed_from + 1, stopped_at + 1))
    assert layout.list_iterations(work / "save") == [resumed_from, stopped_at]
    assert f"stopped by SIGUSR1 at iteration {stopped_at} after saving" in slurm["stdout"]
    assert "requeueing job 4242" in slurm["stdout"]
    assert (work / "scontrol.log").read_text() == "requeue 4242\n"


def test_two_nodes_under_torchrun_train_as_one_data_parallel_job(setting, tmp_path):
    env, recipe, _ = setting
    nodes = {**env, "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
             "SAVE_DIR": str(tmp_path / "save")}
    flags = ("--recipe", str(recipe), "--train-steps", "2")
    scripts = [start(tmp_path / f"node{rank}", {**nodes, "NODE_RANK": str(rank)}, *flags) for rank in (0, 1)]
    node0, node1 = [ended(script, tmp_path / f"node{rank}", nodes["SAVE_DIR"]) for rank, script in enumerate(scripts)]
    assert node0["returncode"] == node1["returncode"] == 0, node0["stderr"][-4000:] + node1["stderr"][-4000:]
    assert "'data_parallel': 2," in node0["stdout"]  # the start line's layout: one process on each node
    assert "iteration" not in node1["stdout"]  # rank 0, on node 0, logs for both
    assert node0["iterations"] == [1, 2]
    assert layout.list_iterations(tmp_path / "save") == [2]


def test_moe_script_passes_its_recipe_with_a_layout_for_two_nodes_of_eight(tmp_path):
    record = tmp_path / "argv"
    command = tmp_path / "megatron-qwen"  # records the flags instead of training
    command.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n')
    command.chmod(0o755)
    srun_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "MEGATRON_QWEN": str(command), "DATA": "data/chat",
                 "PRETRAINED": "converted", "SAVE_DIR": str(tmp_path / "save")}
    subprocess.run(["bash", "examples/sft_qwen3_30b_a3b.sh", "--train-steps", "2000"], cwd=REPO, check=True,
                   env={**worker_env(), **srun_task})
    command_line = record.read_text().splitlines()
    assert command_line[0] == "train"
    config = parse_config(command_line[1:])
    config.check_model(PRESETS[config.model.preset])
    assert (config.model.preset, config.training.train_steps) == ("qwen3-30b-a3b", 2000)
    assert (config.data.data_path, config.checkpoint.pretrained_checkpoint) == (["data/chat"], "converted")
    parallel = config.parallel  # the layout the script's memory derivation is for
    assert (parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel) == (1, 2, 8)
    assert config.data_parallel_size(16) == 8
    with pytest.raises(ValueError, match=r"world size 8 is not a multiple of expert-TP x EP x PP = 16"):
        config.data_parallel_size(8)  # one node is too small (the derivation says why)
