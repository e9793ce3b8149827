"""The worker scripts of this folder, which tests run in processes of their own, and how tests run them: under
torchrun (gloo, CPU) or as a plain process (``from workers import run_torchrun``).

Each script needs an ``if __name__ == "__main__":`` guard (megatron's checkpoint writer spawns a process that
re-imports the main module); scripts import their neighbours by plain name (``from trainer_common import ...``),
since they run with this folder first on their path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the multi-process tests are CPU tests, even on a GPU machine
    for launcher_var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(launcher_var, None)
    return env


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
        )
    return result


def run_torchrun(script: str | Path, nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``script`` (a path, or a file name in tests/workers/) on ``nproc`` local processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(WORKERS / script), *map(str, args),
    ]
    return _run(command, timeout)


def run_python(script: str | Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``script`` as one process without a launcher's environment."""
    return _run([sys.executable, str(WORKERS / script), *map(str, args)], timeout)
