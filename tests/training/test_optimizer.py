"""The Adam kernel of megatron's torch-AdamW fallback: ``training/optimizer.select_adam_kernel``.

On a GPU without Transformer Engine or apex the trainer switches megatron's ``torch.optim.AdamW`` to torch's
fused kernel; on the CPU it keeps torch's default. The switch is exercised here on the CPU, where torch also
has a fused AdamW (tests/workers/optimizer_kernel.py): megatron's distributed optimizer must then really step
with the fused op and compute the same update as the default kernel, and its checkpoint must load with a
``step`` tensor of its own per parameter and the kernel chosen for the device that loads it, not the one
recorded in the checkpoint's param groups.

Gradient norm and clipping run on torch's ``_foreach`` ops (``platform/multi_tensor.py``) in place of megatron's
local fallbacks, which sync with the host once per gradient tensor on a GPU: tests/workers/grad_clipping.py runs
megatron's optimizer twice from the same weights and gradients with clipping engaged, once on megatron's own
fallbacks and once on ours with megatron's made to raise if anything calls them; in bf16 (main weights copied
into the model's through the same path) and in float32 with the distributed optimizer.
"""
import json

import pytest

from workers import run_python

pytestmark = pytest.mark.slow  # a worker process trains megatron optimizers


@pytest.fixture(scope="module")
def findings():
    output = run_python("optimizer_kernel.py").stdout
    line = next(line for line in output.splitlines() if line.startswith("FINDINGS "))
    return json.loads(line.removeprefix("FINDINGS "))


def test_on_the_cpu_megatron_keeps_torch_adamw_with_its_default_kernel(findings):
    assert findings["default_kernel"] == "torch.optim.adamw.AdamW (for-loop)"


def test_the_switch_makes_megatrons_optimizer_step_with_the_fused_op_and_the_same_update(findings):
    assert findings["fused_kernel"] == "torch.optim.adamw.AdamW (fused)"
    assert findings["fused_op_ran"]
    assert findings["weights_moved"] > 1e-4  # lr 1e-3, two updates: the comparison below is not vacuous
    assert findings["max_weight_difference"] < 1e-6


def test_a_fused_optimizers_checkpoint_resumes_with_own_steps_and_the_devices_kernel(findings):
    assert findings["resumed_steps"] == [2.0]
    assert findings["resumed_steps_distinct"]
    # the checkpoint's param groups say fused=True; on the CPU the loader re-selects the default kernel
    assert findings["resumed_kernel"] == "torch.optim.adamw.AdamW (for-loop)"
    assert findings["resumed_max_weight_difference"] < 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_foreach_norm_and_clipping_equal_megatrons_fallbacks_which_never_run(findings, precision):
    # the worker fails (no findings) if megatron's local_multi_tensor_l2_norm or _scale ran during our steps
    found = findings["clipping"][precision]
    assert found["our_norms"] == found["megatron_norms"]
    assert min(found["our_norms"]) > 100 * 0.5  # far above --clip-grad 0.5: clipping scaled every gradient
    assert found["weights_moved"] > 1e-3
    assert found["max_weight_difference"] == 0.0
