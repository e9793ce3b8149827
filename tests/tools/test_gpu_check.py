"""tools/gpu_check.sh, the one prepared command of a session with a GPU, in its CPU dry run: the kernel check sees one
fused (not math) SDPA call per packed document, the benchmark runs ours and the peer on the same rows (a dense
model, and a mixture of experts cut to one layer), and a run
resumed from its iteration-2 checkpoint repeats the uninterrupted run's update 3; its trainer runs use the kernel
fusions a GPU would (``--kernel-fusions``: the suite's 1-process CPU run with them)."""
import json
import subprocess
import sys

import pytest

from workers import REPO, worker_env
from megatron_qwen.models.fusions import FUSED_KERNELS

pytestmark = pytest.mark.slow  # the gpu_check.sh dry run's trainer and benchmark processes


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**worker_env(), "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu-dry-run"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.log").read_text()


def test_the_kernel_check_records_one_fused_call_per_document(dry_run):
    kernels = dry_run[0]["kernels"]
    assert len(kernels["calls"]) == len(kernels["shape"]["documents"])
    assert {call["backend"] for call in kernels["calls"]} == {"FLASH_ATTENTION"}  # the CPU's only fused kernel
    assert all(len(call["shape"]) == 4 for call in kernels["calls"])
    assert set(kernels["ms_per_layer_forward_backward"]) == {"current", "before"}  # varlen_attn: CUDA only
    assert all(ms > 0 for ms in kernels["ms_per_layer_forward_backward"].values())


@pytest.mark.parametrize("part, preset, layers", [("benchmark", "tiny", 4), ("benchmark_moe", "tiny-moe", 1)])
def test_the_benchmark_trains_ours_and_the_peer_on_the_same_tokens(dry_run, part, preset, layers):
    results, log = dry_run
    benchmark = results[part]
    assert (benchmark["preset"], benchmark["num_layers"]) == (preset, layers)
    ours, peer = benchmark["rows"]
    assert (ours["row"], peer["row"]) == ("ours", "peer")
    assert ours["tokens"] == peer["tokens"] > 0
    assert ours["supervised_tokens"] == peer["supervised_tokens"] > 0
    assert benchmark["ours_over_peer_tokens_per_s"] > 0
    if layers == 1:  # the trainer's start line names the model it built: the preset cut to one layer
        assert f"model {preset}-1-layers;" in log


def test_a_resumed_run_repeats_the_uninterrupted_update_with_the_kernel_fusions(dry_run):
    results, log = dry_run
    resume = results["resume"]
    assert len(resume["uninterrupted"]) == 3
    assert resume["resumed_on_this_device"] == resume["uninterrupted"][2:]
    assert f"kernel fusions on (--kernel-fusions), in use: {', '.join(FUSED_KERNELS)};" in log
    assert "at iteration 2 (RNG states restored);" in log  # saved and resumed on the same kind of device
