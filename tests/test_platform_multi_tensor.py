"""Gradient norm and clipping on torch's ``_foreach`` ops (``platform/multi_tensor.py``) in place of megatron's
local fallbacks, which sync with the host once per gradient tensor on a GPU.

tests/workers/grad_clipping.py runs megatron's optimizer twice from the same weights and gradients, with clipping
engaged: once on megatron's own fallbacks, once on ours with megatron's fallbacks made to raise if anything calls
them; in bf16 (main weights copied into the model's through the same path) and in float32 with the distributed
optimizer.
"""
import json

import pytest

from conftest import run_python


@pytest.fixture(scope="module")
def findings():
    output = run_python("grad_clipping.py").stdout
    line = next(line for line in output.splitlines() if line.startswith("FINDINGS "))
    return json.loads(line.removeprefix("FINDINGS "))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_foreach_norm_and_clipping_equal_megatrons_fallbacks_which_never_run(findings, precision):
    # the worker fails (no findings) if megatron's local_multi_tensor_l2_norm or _scale ran during our steps
    found = findings[precision]
    assert found["our_norms"] == found["megatron_norms"]
    assert min(found["our_norms"]) > 100 * 0.5  # far above --clip-grad 0.5: clipping scaled every gradient
    assert found["weights_moved"] > 1e-3
    assert found["max_weight_difference"] == 0.0
