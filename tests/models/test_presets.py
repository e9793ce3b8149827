"""Presets as plain data: reading published config.json files (dense and mixtures of experts), model_config.json
before and after the expert fields, embedding-row rules, SLURM hosts, the converted model's name."""
import dataclasses
import json
from pathlib import Path

import pytest
from transformers import Qwen2MoeConfig, Qwen3MoeConfig

from megatron_qwen.models.build import padded_vocab_size
from megatron_qwen.models.presets import PRESETS, QwenConfig, from_hf_config
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


# model_config.json of dense presets as the code before the mixture-of-experts fields wrote it (QwenConfig.to_json)
DENSE_BEFORE_MOE = Path(__file__).with_name("model_config_before_moe_fixture.json")


@pytest.mark.parametrize("name", ["tiny", "qwen-14b", "qwen3-8b"])
def test_dense_model_config_is_written_and_read_as_before_the_moe_fields(name):
    written_before = json.loads(DENSE_BEFORE_MOE.read_text())[name]
    assert PRESETS[name].to_json() == written_before
    assert QwenConfig.from_dict(json.loads(written_before)) == PRESETS[name]


def test_moe_model_config_round_trips():
    for cfg in PRESETS.values():
        assert QwenConfig.from_dict(json.loads(cfg.to_json())) == cfg


# Published config.json values (Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B), written by transformers' own config
# classes as save_pretrained writes them (transformers 5 renames Qwen3-MoE's num_experts to num_local_experts).
QWEN15_MOE_A27B = dict(
    hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
    num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=151936, max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, decoder_sparse_step=1,
    mlp_only_layers=[], tie_word_embeddings=False,
)
MOE_FIELDS = ["num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_norm_topk_prob",
              "moe_shared_expert_ffn_hidden_size", "moe_dense_layers", "qkv_bias", "qk_norm", "kv_channels",
              "max_position_embeddings"]


def write_transformers_config(folder, config) -> None:
    config.to_json_file(folder / "config.json")


@pytest.mark.parametrize("config_class, values, preset", [
    (Qwen2MoeConfig, QWEN15_MOE_A27B, "qwen1.5-moe-a2.7b"), (Qwen3MoeConfig, QWEN3_30B_A3B, "qwen3-30b-a3b")])
def test_moe_config_json_reads_as_the_preset(tmp_path, config_class, values, preset):
    write_transformers_config(tmp_path, config_class(**values))
    read = from_hf_config(tmp_path)
    for field in ARCHITECTURE_FIELDS + MOE_FIELDS:
        assert getattr(read, field) == getattr(PRESETS[preset], field), field


@pytest.mark.parametrize("config_class", [Qwen2MoeConfig, Qwen3MoeConfig])
def test_dense_layers_follow_mlp_only_layers_and_the_sparse_step(tmp_path, config_class):
    shape = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=16)
    # transformers: layer i is sparse unless listed, and only when (i + 1) is a multiple of decoder_sparse_step
    write_transformers_config(tmp_path, config_class(**shape, decoder_sparse_step=2, mlp_only_layers=[3]))
    read = from_hf_config(tmp_path)
    assert read.moe_dense_layers == (0, 2, 3, 4)
    assert [read.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
