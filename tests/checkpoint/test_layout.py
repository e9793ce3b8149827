"""The checkpoint directory layout: iteration discovery, the latest marker, pruning, the tokenizer
manifest, atomic saves (one single-process save run), a save that fails on one of two ranks, and the converter's
errors for bad input."""
import json

import pytest

from workers import run_python, run_torchrun
from megatron_qwen.checkpoint import layout
from megatron_qwen.cli import convert


def make_iteration(root, iteration):
    folder = root / layout.iteration_name(iteration)
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    return folder


def test_iterations_are_listed_by_number_ignoring_unfinished_ones(tmp_path):
    for iteration in (20, 3, 100):
        make_iteration(tmp_path, iteration)
    (tmp_path / "iter_0000200.partial").mkdir()
    (tmp_path / "iter_0000020.old").mkdir()
    (tmp_path / "iter_12").mkdir()
    (tmp_path / "notes").mkdir()
    assert layout.iteration_name(20) == "iter_0000020"
    assert layout.list_iterations(tmp_path) == [3, 20, 100]
    assert layout.list_iterations(tmp_path / "missing") == []


def test_resolve_iteration_follows_the_latest_marker(tmp_path):
    for iteration in (0, 5):
        make_iteration(tmp_path, iteration)
    (tmp_path / "latest").write_text("5\n")
    assert layout.latest_iteration(tmp_path) == 5
    assert layout.resolve_iteration(tmp_path) == tmp_path / "iter_0000005"
    assert layout.resolve_iteration(tmp_path, 0) == tmp_path / "iter_0000000"


def test_resolve_iteration_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        layout.resolve_iteration(tmp_path / "nowhere")
    make_iteration(tmp_path, 7)
    with pytest.raises(FileNotFoundError, match=r"no 'latest' marker.*\[7\]"):
        layout.resolve_iteration(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"iter_0000008: no complete iteration 8"):
        layout.resolve_iteration(tmp_path, 8)
    (tmp_path / "latest").write_text("seven")
    with pytest.raises(ValueError, match=r"latest: expected an iteration number, found 'seven'"):
        layout.latest_iteration(tmp_path)


def test_prune_keeps_the_newest_and_the_latest(tmp_path):
    for iteration in (1, 2, 3, 4):
        make_iteration(tmp_path, iteration)
    (tmp_path / "latest").write_text("1")  # e.g. a resumed run re-marked an older iteration
    layout.prune(tmp_path, keep_last=2)
    assert layout.list_iterations(tmp_path) == [1, 3, 4]
    with pytest.raises(ValueError, match="at least 1"):
        layout.prune(tmp_path, keep_last=0)


def test_tokenizer_manifest_detects_a_changed_file(tmp_path):
    folder = make_iteration(tmp_path, 0) / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("original")
    digest = layout.sha256_file(folder / "tokenizer.json")
    (folder / "manifest.json").write_text(json.dumps({"files": {"tokenizer.json": digest}}))
    assert layout.tokenizer_manifest(folder.parent)["files"] == {"tokenizer.json": digest}
    (folder / "tokenizer.json").write_text("edited")
    with pytest.raises(ValueError, match=r"tokenizer.json: sha256 .* differs"):
        layout.tokenizer_manifest(folder.parent)


@pytest.mark.slow
def test_saves_are_complete_pruned_and_replace_crash_leftovers(tmp_path):
    out = tmp_path / "out.json"
    run_python("convert_save_iterations.py", tmp_path / "root", out)
    result = json.loads(out.read_text())
    assert result["iterations"] == [3, 4] and result["latest"] == 4
    assert result["entries"] == ["iter_0000003", "iter_0000004", "latest"]  # no .partial or .old left
    assert "junk" not in result["files"]  # the stale .partial was discarded, not renamed into place
    assert {"metadata.json", "model_config.json", "tokenizer/manifest.json", "tokenizer/tokenizer.json",
            "trainer/state.json"} <= set(result["files"])
    assert result["loaded"] == [[4.0] * 3] * 4
    assert result["config"] == "tiny"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result["manifest"]["files"])
    assert result["manifest"]["vocab_file"] == "tokenizer.json"


@pytest.mark.slow
def test_a_save_failing_on_the_writing_rank_stops_both_ranks_and_keeps_the_last_iteration(tmp_path):
    root = tmp_path / "root"
    run_torchrun("save_failure.py", 2, root, tmp_path / "out", timeout=120)  # no rank left waiting at a barrier
    writer, other = (json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in (0, 1))
    assert writer["error"].startswith(f"{root}: saving iteration 2 failed (")
    assert "model_config.json" in writer["error"]  # the writer's own error, named
    assert other["error"].startswith(f"{root}: saving iteration 2 failed (on another rank)")
    for result in (writer, other):
        assert "; the latest, iteration 1, is intact; " in result["error"]
        assert result["error"].endswith(" GiB free on its file system")
        assert result["entries"] == ["iter_0000001", "latest"]  # the failed save's staging folder removed
        assert result["latest"] == 1


def convert_error(capsys, *argv) -> str:
    assert convert.main([str(arg) for arg in argv]) == 2
    return capsys.readouterr().err


def test_hf_to_mcore_reports_a_missing_or_incomplete_model_directory(tmp_path, capsys):
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "absent", "--mcore-dir", tmp_path / "m")
    assert f"--hf-dir {tmp_path / 'absent'}: no config.json" in error
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "rms_norm_eps": 1e-6}))
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--mcore-dir", tmp_path / "m")
    assert "no weights found (looked for model.safetensors.index.json, model.safetensors" in error
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--mcore-dir", tmp_path / "m")
    assert "names shards that do not exist" in error and "gone.safetensors" in error
    assert not (tmp_path / "m").exists()


QWEN2_ONE_LAYER = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.0.{name}" for name in [
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        *(f"self_attn.{p}_proj.{part}" for p in "qkv" for part in ("weight", "bias"))]]


def test_hf_to_mcore_rejects_missing_and_foreign_tensors(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 16, "vocab_size": 32, "rms_norm_eps": 1e-6}))
    weights = tmp_path / "hf" / "model.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(1)}, weights)  # a first-generation tensor
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--mcore-dir", tmp_path / "m")
    assert "tensors the qwen2 layout needs but the checkpoint lacks: ['lm_head.weight', " in error
    save_file({name: torch.zeros(1) for name in QWEN2_ONE_LAYER + ["transformer.wte.weight"]}, weights)
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--mcore-dir", tmp_path / "m")
    assert "tensors the qwen2 layout does not know: ['transformer.wte.weight']" in error


def test_mcore_to_hf_reports_a_missing_checkpoint_and_an_occupied_output(tmp_path, capsys):
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "absent", "--hf-dir", tmp_path / "o")
    assert f"checkpoint directory {tmp_path / 'absent'} does not exist" in error
    (tmp_path / "mc").mkdir()
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o")
    assert "no 'latest' marker" in error
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text("{}")
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o")
    assert "exists and is not empty" in error


def write_hf_config(folder, **fields):
    folder.mkdir(exist_ok=True)
    config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "rms_norm_eps": 1e-6, **fields}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fields,message", [
    ({"attention_bias": True}, "attention_bias is true; Qwen3 checkpoints have no attention biases"),
    ({"use_sliding_window": True}, "sliding-window attention is not implemented"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not implemented"),
    ({"model_type": "qwen2_vl"},
     "model_type 'qwen2_vl' is not one of 'qwen', 'qwen2', 'qwen3', 'qwen2_moe', 'qwen3_moe'"),
    ({"model_type": "qwen3_moe"}, "a mixture-of-experts config.json without num_experts"),
])
def test_hf_to_mcore_refuses_architectures_it_does_not_implement(tmp_path, capsys, fields, message):
    write_hf_config(tmp_path / "hf", **fields)
    error = convert_error(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--mcore-dir", tmp_path / "m")
    assert f"{tmp_path / 'hf' / 'config.json'}: {message}" in error
    assert not (tmp_path / "m").exists()


def test_qwen3_config_defaults_to_transformers_head_dim(tmp_path):
    from megatron_qwen.models.presets import from_hf_config

    write_hf_config(tmp_path / "hf")  # no head_dim: transformers' Qwen3Config takes 128, not 64 / 4
    cfg = from_hf_config(tmp_path / "hf")
    assert (cfg.generation, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == ("qwen3", 128, True, False)
    write_hf_config(tmp_path / "hf", model_type="qwen2")
    assert from_hf_config(tmp_path / "hf").kv_channels == 16


@pytest.mark.parametrize("preset,hf_format,message", [
    ("qwen3-0.6b", "qwen2", "query/key norms and no QKV bias, which Qwen2ForCausalLM cannot hold; use --format qwen3"),
    ("qwen3-0.6b", "qwen", "which the first-generation layout cannot hold; use --format qwen3"),
    ("qwen2.5-0.5b", "qwen3", "has a QKV bias and no query/key norms, which Qwen3ForCausalLM cannot hold"),
    ("qwen3-30b-a3b", "qwen3", "is a mixture of experts, which Qwen3ForCausalLM cannot hold; use --format qwen3_moe"),
    ("qwen3-30b-a3b", "qwen2_moe", "query/key norms and no QKV bias, which Qwen2MoeForCausalLM cannot hold"),
    ("qwen1.5-moe-a2.7b", "qwen3_moe", "QKV bias and no query/key norms, which Qwen3MoeForCausalLM cannot hold"),
    ("qwen3-0.6b", "qwen3_moe", "is a dense model, which Qwen3MoeForCausalLM cannot hold; use --format qwen3"),
])
def test_mcore_to_hf_refuses_a_format_that_cannot_hold_the_model(tmp_path, capsys, preset, hf_format, message):
    from megatron_qwen.models.presets import PRESETS

    folder = make_iteration(tmp_path / "mc", 0)
    (folder / layout.MODEL_CONFIG).write_text(PRESETS[preset].to_json())
    (tmp_path / "mc" / layout.LATEST).write_text("0")
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o",
                          "--format", hf_format)
    assert message in error
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("content, reason", [
    ('{"hidden_size": 64,', "Expecting property name"),
    ("[1]", "must be a mapping"),
    ('{"hidden_size": 64, "layers": 2}', "unexpected keyword argument"),
])
def test_mcore_to_hf_names_an_unreadable_model_config(tmp_path, capsys, content, reason):
    folder = make_iteration(tmp_path / "mc", 0)
    (folder / layout.MODEL_CONFIG).write_text(content)
    (tmp_path / "mc" / layout.LATEST).write_text("0")
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o")
    assert f"{folder / layout.MODEL_CONFIG}: not a model configuration (" in error and reason in error
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_trainer_state_without_what_a_resume_reads_is_named(tmp_path):
    from megatron_qwen.training.checkpointing import CheckpointError, read_trainer_state

    folder = make_iteration(tmp_path / "save", 4)
    state = folder / "trainer_state.json"
    state.write_text(json.dumps({"iteration": 4, "scheduler": {}, "data": {}}))  # no "layout"
    with pytest.raises(CheckpointError, match=rf"^{state}: has no layout; it was edited"):
        read_trainer_state(folder)
    state.write_text("[]")
    with pytest.raises(CheckpointError, match=rf"^{state}: has no iteration, layout, scheduler, data"):
        read_trainer_state(folder)


def test_a_trainer_state_of_another_iteration_than_its_folder_is_named(tmp_path):
    from megatron_qwen.training.checkpointing import CheckpointError, read_trainer_state

    folder = make_iteration(tmp_path / "save", 4)
    state = folder / "trainer_state.json"
    for iteration in (3, "4"):  # edited by hand
        state.write_text(json.dumps({"iteration": iteration, "layout": {}, "scheduler": {}, "data": {}}))
        with pytest.raises(CheckpointError, match=rf"^{state}: iteration {iteration!r} disagrees with its folder "
                                                  "iter_0000004$"):
            read_trainer_state(folder)


def test_mcore_to_hf_asks_which_chat_settings_when_the_training_data_had_several(tmp_path, capsys):
    from megatron_qwen.models.presets import PRESETS

    folder = make_iteration(tmp_path / "mc", 0)
    (folder / layout.MODEL_CONFIG).write_text(PRESETS["tiny"].to_json())
    chat = layout.chat_settings(["Be brief.", "", "Be brief."], ["split", "keep", "keep"])
    (folder / layout.CHAT_SETTINGS).write_text(chat)
    (tmp_path / "mc" / layout.LATEST).write_text("0")
    assert layout.training_chat_settings(folder) == {"system_prompts": ["", "Be brief."],
                                                     "reasoning_history": ["keep", "split"]}
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o")
    assert "trained on datasets with different default system prompts ['', 'Be brief.']" in error
    assert "--system-prompt" in error
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o",
                          "--system-prompt", "")
    assert "trained on datasets with different reasoning histories ['keep', 'split']" in error
    assert "--reasoning-history" in error
    # with the choices made, the export goes on (to the next problem of this stub: it has no tokenizer)
    error = convert_error(capsys, "mcore-to-hf", "--mcore-dir", tmp_path / "mc", "--hf-dir", tmp_path / "o",
                          "--system-prompt", "", "--reasoning-history", "split")
    assert "tokenizer" in error and "trained on datasets" not in error


def test_chat_settings_written_before_the_reasoning_split_mean_keep(tmp_path):
    (tmp_path / layout.CHAT_SETTINGS).write_text(json.dumps({"system_prompts": ["Be brief."]}))
    assert layout.training_chat_settings(tmp_path) == {"system_prompts": ["Be brief."], "reasoning_history": ["keep"]}
