"""Presets as plain data: reading published config.json files (shapes and names), embedding-row rules, SLURM hosts."""
import dataclasses
import json

import pytest

from megatron_qwen.models.build import padded_vocab_size
from megatron_qwen.models.presets import PRESETS, from_hf_config
from megatron_qwen.platform.distributed import first_slurm_host

# Excerpts of published config.json files (Qwen/Qwen-14B and Qwen/Qwen2.5-7B-Instruct).
QWEN_14B_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 5120,
    "intermediate_size": 27392, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192, "no_bias": True, "num_attention_heads": 40,
    "num_hidden_layers": 40, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048,
    "tie_word_embeddings": False, "vocab_size": 152064,
}
QWEN25_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "vocab_size": 152064,
}
ARCHITECTURE_FIELDS = [
    "generation", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
    "ffn_hidden_size", "vocab_size", "rope_base", "norm_epsilon", "tied_embeddings",
]


@pytest.mark.parametrize("hf_config, preset", [(QWEN_14B_CONFIG, "qwen-14b"), (QWEN25_7B_CONFIG, "qwen2.5-7b")])
def test_published_config_reads_as_the_preset(tmp_path, hf_config, preset):
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    read = from_hf_config(tmp_path)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(read, field) == getattr(PRESETS[preset], field), field


def test_transformers5_rope_parameters_give_the_rope_base(tmp_path):
    # transformers 5 saves the base only as rope_parameters.rope_theta.
    saved = {key: value for key, value in QWEN25_7B_CONFIG.items() if key != "rope_theta"}
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert from_hf_config(tmp_path).rope_base == 1e6


@pytest.mark.parametrize("folder, recorded, name", [
    ("Qwen2.5-7B-Instruct", {}, "Qwen2.5-7B-Instruct"),
    ("hf", {}, "Qwen2ForCausalLM (hf)"),  # an export named after its format: the architecture says more
    ("hub/models--Qwen--Qwen2.5-7B-Instruct/snapshots/a09a35458c702b33eeacc393d103063234e8bc28", {},
     "Qwen2.5-7B-Instruct"),
    ("hf", {"_name_or_path": "/scratch/models/Qwen2.5-7B-sft"}, "Qwen2.5-7B-sft"),
])
def test_a_read_model_is_named_after_its_folder_or_architecture(tmp_path, folder, recorded, name):
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "config.json").write_text(json.dumps({**QWEN25_7B_CONFIG, **recorded}))
    assert from_hf_config(tmp_path / folder).name == name


def test_qwen_rows_are_kept_at_every_power_of_two_tp():
    for cfg in PRESETS.values():
        for tp in (1, 2, 4, 8, 16, 32, 64, 128):
            assert padded_vocab_size(cfg, tp) == cfg.vocab_size


def test_odd_vocabulary_pads_to_one_size_for_every_tp():
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=1001)
    assert {padded_vocab_size(cfg, tp) for tp in (1, 2, 4, 8)} == {1024}
    with pytest.raises(ValueError, match="tensor-parallel size 3"):
        padded_vocab_size(cfg, 3)


@pytest.mark.parametrize(
    "nodelist, host", [("gpu07", "gpu07"), ("gpu[03-05,09],cpu1", "gpu03"), ("node[12,15]", "node12"), ("a1,b2", "a1")]
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host
