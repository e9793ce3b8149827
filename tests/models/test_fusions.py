"""``--kernel-fusions`` (``models/fusions.py``): the decision by flag, device and start-up probe, and the probe itself on
a host whose C compiler does not work. (A CPU run with the fusions asked for: tests/tools/test_gpu_check.py.)"""
import re
import subprocess
import sys

import pytest

from workers import REPO, worker_env
from megatron_qwen.models.fusions import choose_kernel_fusions

FAILURE = "InductorError: no working C++ compiler"


@pytest.mark.parametrize(
    "requested, device, probe_failure, expected",
    [
        (None, "cpu", None, (False, "off (CPU; --kernel-fusions compiles them)")),
        (None, "cuda", None, (True, "on (torch.compile probe passed)")),
        (None, "cuda", FAILURE, (False, f"off (probe failed: {FAILURE})")),
        (True, "cpu", None, (True, "on (--kernel-fusions)")),
        (True, "cuda", None, (True, "on (--kernel-fusions)")),
        (False, "cpu", None, (False, "off (--no-kernel-fusions)")),
        (False, "cuda", None, (False, "off (--no-kernel-fusions)")),
    ],
)
def test_the_decision_by_flag_device_and_probe(requested, device, probe_failure, expected):
    probes = []
    decision = choose_kernel_fusions(requested, device, lambda: probes.append(1) or probe_failure)
    assert decision == expected
    # the probe (a compilation: seconds) runs only where its answer decides
    assert len(probes) == (requested is True or (requested is None and device == "cuda"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fusions_asked_for_where_the_probe_fails_are_an_error_naming_the_flag(device):
    with pytest.raises(ValueError, match=re.escape(f"--kernel-fusions: torch.compile does not work here ({FAILURE})")):
        choose_kernel_fusions(True, device, lambda: FAILURE)


@pytest.mark.slow
def test_the_probe_reports_a_host_without_a_working_c_compiler(tmp_path):
    env = {**worker_env(), "CC": "/bin/false", "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    probe = "from megatron_qwen.models.fusions import compile_probe; print('PROBE', compile_probe('cpu'))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    assert "compiler" in line.lower() and line != "PROBE None", line
