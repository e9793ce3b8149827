"""Hugging Face <-> megatron-core conversion of mixtures of experts, end to end, on small random models (CPU).

Source checkpoints, all made with ``transformers`` (``hf_models.random_moe``: 8 experts, 2 per token):

* ``q2``: Qwen2-MoE (QKV biases, a gated shared expert, routing probabilities not renormalized) whose second
  layer is dense (``mlp_only_layers``), saved with ``save_pretrained`` (per-expert tensor names, as published).
* ``q3``: Qwen3-MoE (query/key norms with a ``head_dim`` of 32 where ``hidden / heads`` is 16, renormalized
  routing), saved with ``save_pretrained``.
* ``q3_fused``: the same model as ``q3`` written from its in-memory state dict, where ``transformers`` 5 holds each
  layer's experts fused (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``).

Each is converted to megatron-core and exported back in its default format.
"""
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from workers import REPO, run_python, run_torchrun, worker_env
from hf_models import EXPERT_FFN, EXPERTS, assert_same_tensors, copy_tokenizer, random_moe, read_safetensors_dir

pytestmark = pytest.mark.slow  # conversion tools run in worker processes, verification under torchrun

PROMPTS = [[3, 17, 250, 9, 42, 7, 199, 1, 64, 128, 5], [5, 120, 33, 299, 2]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_moe")
    models = {"q2": random_moe(1, "qwen2_moe", dense_layers=(1,)), "q3": random_moe(2, "qwen3_moe")}
    for name, model in models.items():
        model.save_pretrained(tmp / f"{name}_hf")
        copy_tokenizer(tmp / f"{name}_hf")
    fused = tmp / "q3_fused_hf"
    fused.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in models["q3"].state_dict().items()},
              str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_bytes((tmp / "q3_hf" / "config.json").read_bytes())
    copy_tokenizer(fused)
    commands = []
    for name in ("q2", "q3", "q3_fused"):
        commands += [["hf-to-mcore", "--hf-dir", tmp / f"{name}_hf", "--mcore-dir", tmp / f"{name}_mc"],
                     ["mcore-to-hf", "--mcore-dir", tmp / f"{name}_mc", "--hf-dir", tmp / f"{name}_out"]]
    (tmp / "commands.json").write_text(json.dumps([["convert_checkpoint", *map(str, command)] for command in commands]))
    run_python("tool_runs.py", tmp / "commands.json")
    return SimpleNamespace(dir=tmp, models=models)


def test_transformers_save_pretrained_writes_the_published_per_expert_names(converted):
    names = read_safetensors_dir(converted.dir / "q3_hf")
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in names)
    fused = read_safetensors_dir(converted.dir / "q3_fused_hf")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 2 * EXPERT_FFN, 64)


@pytest.mark.parametrize("name", ["q2", "q3"])
def test_round_trip_reproduces_every_tensor(converted, name):
    assert_same_tensors(converted.dir / f"{name}_hf", converted.dir / f"{name}_out")


def test_fused_experts_are_read_and_exported_under_the_per_expert_names(converted):
    fused = read_safetensors_dir(converted.dir / "q3_fused_hf")
    exported = read_safetensors_dir(converted.dir / "q3_fused_out")
    # the same model saved by save_pretrained, which splits the experts itself
    assert {name: tensor.shape for name, tensor in exported.items()} == {
        name: tensor.shape for name, tensor in read_safetensors_dir(converted.dir / "q3_hf").items()}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = fused[prefix + "gate_up_proj"], fused[prefix + "down_proj"]
        for expert in range(EXPERTS):
            names = f"{prefix}{expert}."
            assert torch.equal(exported[names + "gate_proj.weight"], gate_up[expert, :EXPERT_FFN])
            assert torch.equal(exported[names + "up_proj.weight"], gate_up[expert, EXPERT_FFN:])
            assert torch.equal(exported[names + "down_proj.weight"], down[expert])


def transformers_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", ["q2", "q3"])
def test_exported_model_loads_in_transformers_with_the_same_logits(converted, name):
    loaded = AutoModelForCausalLM.from_pretrained(converted.dir / f"{name}_out").eval()
    original = converted.models[name]
    assert type(loaded) is type(original)
    assert (loaded.config.num_experts, loaded.config.norm_topk_prob, loaded.config.mlp_only_layers) == (
        original.config.num_experts, original.config.norm_topk_prob, original.config.mlp_only_layers)
    for ids in PROMPTS:
        assert torch.equal(transformers_logits(loaded, ids), transformers_logits(original, ids))


def test_model_config_records_the_experts(converted):
    config = json.loads((converted.dir / "q2_mc" / "iter_0000000" / "model_config.json").read_text())
    assert {key: config[key] for key in ("generation", "num_experts", "moe_ffn_hidden_size", "moe_router_topk",
                                         "moe_norm_topk_prob", "moe_shared_expert_ffn_hidden_size",
                                         "moe_dense_layers")} == {
        "generation": "qwen2_moe", "num_experts": EXPERTS, "moe_ffn_hidden_size": EXPERT_FFN, "moe_router_topk": 2,
        "moe_norm_topk_prob": False, "moe_shared_expert_ffn_hidden_size": 48, "moe_dense_layers": [1]}


def test_checkpoint_saved_at_ep2_loads_at_ep1_with_every_tensor_equal(converted):
    out = converted.dir / "reshard"
    out.mkdir()
    run_torchrun("moe_reshard.py", 2, converted.dir / "q2_mc", out)
    result = json.loads((out / "result.json").read_text())
    assert (result["experts_at_ep2"], result["experts_at_ep1"]) == (EXPERTS // 2, EXPERTS)
    assert result["equal"] and result["tensors"] > 20


def run_verify(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "verify_conversion.py"), *map(str, args)]
    return subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)


def reported(stdout: str, what: str) -> float:
    return float(re.search(rf"max \|{re.escape(what)} difference\|\s+(\S+)", stdout).group(1))


# One generation per layout (time); both generations pass at both layouts (docs/checkpoints.md).
@pytest.mark.parametrize("name, layout", [("q3", ["--ep", 2]), ("q2", ["--tp", 2, "--ep", 2])])
def test_verify_conversion_passes_at_expert_parallel_layouts(converted, name, layout):
    result = run_verify("--hf-dir", converted.dir / f"{name}_hf", "--mcore-dir", converted.dir / f"{name}_mc",
                        *layout)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "PASS" in result.stdout
    tp = layout[1] if layout[0] == "--tp" else 1
    assert f"TP={tp} PP=1 EP=2 expert-TP={tp}" in result.stdout
    assert "random token ids" in result.stdout  # 300 embedding rows cannot hold the ChatML ids
    assert reported(result.stdout, "logits") < 1e-4
    assert reported(result.stdout, "per-token loss") < 1e-4


def test_an_expert_layout_that_does_not_fit_is_one_line_before_any_process_starts(converted):
    result = run_verify("--hf-dir", converted.dir / "q3_hf", "--mcore-dir", converted.dir / "q3_mc", "--ep", 3)
    assert result.returncode == 2
    assert re.fullmatch(rf"megatron-qwen verify: error: --ep: .*'s {EXPERTS} experts do not split evenly over 3 ranks",
                        result.stderr.strip().splitlines()[-1])
    assert "Traceback" not in result.stderr and "torch.distributed" not in result.stderr
