"""The blockwise output-layer loss (models/output_loss.py) against megatron-core's own path on the same weights:
``output_layer`` with the padded-row mask + ``compute_language_model_loss`` (see tests/workers/output_loss_checks.py).

Every case has a vocabulary of 1000 rows padded to 1024 and blocks of 300 vocabulary rows, which divide neither
the 1000 real rows nor a TP2 rank's 512 or 488."""
import json

import pytest

from workers import run_python, run_torchrun

pytestmark = pytest.mark.slow  # a worker process and a 2-process torchrun launch

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # relative to the largest magnitude; bf16 keeps 8 bits


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    out = tmp_path_factory.mktemp("output_loss_tp1") / "results.json"
    run_python("output_loss_checks.py", out, timeout=200)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("output_loss_tp2") / "results.json"
    run_torchrun("output_loss_checks.py", 2, out, timeout=200)
    return json.loads(out.read_text())


def postprocess_cases(results):
    return results["postprocess"].items()


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_loss_and_gradients_equal_megatrons_output_layer_and_cross_entropy(layout, request):
    results = request.getfixturevalue(layout)
    cases = dict(postprocess_cases(results))
    # TP1: plain; TP2: with and without sequence parallelism; tied and untied; float32 and bf16; [s, b, h] and
    # packed [t, 1, h]
    assert len(cases) == (8 if layout == "tp1" else 16)
    for name, check in cases.items():
        tolerance = TOLERANCE["bfloat16" if "bfloat16" in name else "float32"]
        assert check["loss_shape_equal"], name
        assert check["loss"] < 1e-6, name  # the loss is float32 in both paths
        assert check["hidden_grad"] < tolerance, name
        assert check["weight_grad"] < tolerance, name


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_padded_vocabulary_rows_get_no_gradient(layout, request):
    for name, check in postprocess_cases(request.getfixturevalue(layout)):
        assert check["padded_rows_grad_zero"], name


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_no_tensor_as_large_as_the_logits_of_the_micro_batch(layout, request):
    for name, check in postprocess_cases(request.getfixturevalue(layout)):
        # the probe sees megatron's whole logits, so it would see ours
        assert check["largest_tensor_megatron"] >= check["full_logits"], name
        assert check["largest_tensor"] <= check["block_logits"] < check["full_logits"], name


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_whole_model_loss_and_ddp_gradients_equal_megatrons_postprocess(layout, request):
    checks = request.getfixturevalue(layout)["model"]
    expected = {"sp0_tied1_padded", "sp0_tied1_packed", "sp0_tied0_padded", "sp0_tied0_packed"}
    if layout == "tp2":
        expected |= {"sp1_tied1_padded", "sp1_tied0_padded"}
    assert set(checks) == expected
    for name, check in checks.items():
        assert check["loss_shape_equal"], name
        assert check["output_weight_grad_scale"] > 1e-2, name  # a gradient worth comparing
        assert check["loss"] < 1e-6, name
        assert check["grads"] < 1e-5, name
