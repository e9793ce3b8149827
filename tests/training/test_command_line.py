"""The trainer's command line (``python -m megatron_qwen.train``) as a launcher-less process: a bad pretrained
checkpoint exits 2 before anything is saved, and a preemption signal while torch is still importing stops the run
cleanly."""
import subprocess
import sys

import pytest

from workers import REPO, run_python, worker_env
from workers.trainer_common import fixture_dir, run_args

pytestmark = pytest.mark.slow


def run_command_line(*arguments) -> subprocess.CompletedProcess:
    """``python ARGUMENTS`` as a launcher-less process; its status is the test's to check."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300
    )


def test_the_command_line_reports_a_bad_pretrained_checkpoint_and_exits_2(tmp_path_factory, tmp_path):
    data = fixture_dir(tmp_path_factory, run_python)
    flags = run_args(str(data / "plain"), str(tmp_path / "missing"), str(tmp_path / "save"))
    result = run_command_line("-m", "megatron_qwen.train", *flags)
    assert result.returncode == 2
    assert f"--pretrained-checkpoint {tmp_path / 'missing'}: checkpoint directory" in result.stderr
    assert not (tmp_path / "save").exists()  # nothing started from random weights


# Runs the trainer's command line with SIGTERM sent to itself at the moment torch starts importing (the seconds
# every rank spends importing torch and megatron-core, where a scheduler's notice lands as well as anywhere)
SIGNAL_AT_TORCH_IMPORT = """
import os, runpy, signal, sys

class SignalAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SignalAtTorch())
runpy.run_module("megatron_qwen.train", run_name="__main__", alter_sys=True)
"""


def test_a_signal_while_torch_imports_stops_the_run_cleanly_before_any_update(tmp_path_factory, tmp_path):
    data = fixture_dir(tmp_path_factory, run_python)
    flags = run_args(str(data / "plain"), str(data / "start"), str(tmp_path / "save"))
    result = run_command_line("-c", SIGNAL_AT_TORCH_IMPORT, *flags)
    assert result.returncode == 0, result.stderr[-3000:]  # not -15: the default action of SIGTERM
    assert "stopped by SIGTERM at iteration 0, during start-up, before any update" in result.stdout
    assert not (tmp_path / "save" / "tensorboard" / "metrics.jsonl").read_text()
