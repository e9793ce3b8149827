"""The model's pieces in one CPU process (see tests/workers/model_checks.py): parameter counts of
every preset, checkpoint key names, our SDPA core attention against megatron-core's, packed
sequences, attention dropout, activation recomputation and vocabulary padding."""
import json

import pytest

from workers import run_python
from megatron_qwen.models.presets import PRESETS

pytestmark = pytest.mark.slow  # a worker process builds and runs the models

# Totals published on the Qwen2.5 model cards.
QWEN25_PUBLISHED_TOTALS = {
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-14b": 14.7e9,
    "qwen2.5-32b": 32.5e9,
    "qwen2.5-72b": 72.7e9,
}

# Non-embedding parameters (no embedding, no output layer) published on the Qwen3 model cards; the cards' totals
# are rounded to two significant digits (e.g. "1.7B"), these to two or three.
QWEN3_PUBLISHED_NON_EMBEDDING = {
    "qwen3-0.6b": 0.44e9,
    "qwen3-1.7b": 1.4e9,
    "qwen3-4b": 3.6e9,
    "qwen3-8b": 6.95e9,
    "qwen3-14b": 13.2e9,
    "qwen3-32b": 31.2e9,
}

# Mixtures of experts: (total, activated) as the model cards state them. The cards round to two or three digits,
# some to fewer than 1% resolves (Qwen3-30B-A3B's "3.3B" activated counts 3.353B, Qwen2-57B-A14B's "14B" 14.25B):
# there the count must lie within one unit of the card's last digit.
MOE_PUBLISHED = {
    "qwen1.5-moe-a2.7b": ("14.3B", "2.7B"),
    "qwen2-57b-a14b": ("57B", "14B"),
    "qwen3-30b-a3b": ("30.5B", "3.3B"),
    "qwen3-235b-a22b": ("235B", "22B"),
    "qwen3-coder-30b-a3b": ("30.5B", "3.3B"),
}

# First-generation config.json values (hidden_size, num_hidden_layers, intermediate_size, vocab_size),
# as published in Qwen/Qwen-{1_8B,7B,14B,72B}; intermediate_size is twice the per-branch FFN.
QWEN1_CONFIGS = {
    "qwen-1.8b": (2048, 24, 11008, 151936),
    "qwen-7b": (4096, 32, 22016, 151936),
    "qwen-14b": (5120, 40, 27392, 152064),
    "qwen-72b": (8192, 80, 49152, 152064),
}

# The checkpoint names of megatron-core's Transformer Engine GPT spec (as listed in TE-trained
# megatron checkpoints), plus the QKV bias Qwen adds.
TE_CHECKPOINT_KEYS = sorted([
    "embedding.word_embeddings.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_qkv.bias",
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.core_attention._extra_state",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.weight",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2.weight",
    "decoder.layers.mlp.linear_fc2._extra_state",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm._extra_state",
    "output_layer.weight",
])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_checks") / "results.json"
    run_python("model_checks.py", out, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(QWEN25_PUBLISHED_TOTALS))
def test_qwen25_parameter_count_matches_model_card(results, name):
    published = QWEN25_PUBLISHED_TOTALS[name]
    assert abs(results["parameter_counts"][name]["total"] - published) / published < 0.01


@pytest.mark.parametrize("name", sorted(QWEN3_PUBLISHED_NON_EMBEDDING))
def test_qwen3_non_embedding_parameter_count_matches_model_card(results, name):
    published = QWEN3_PUBLISHED_NON_EMBEDDING[name]
    assert abs(results["parameter_counts"][name]["non_embedding"] - published) / published < 0.01


def matches_card(count: int, card: str) -> bool:
    """Within 1% of the card's figure, or within one unit of its last stated digit where that is coarser."""
    figure = card.removesuffix("B")
    last_digit = 10 ** -len(figure.partition(".")[2]) * 1e9
    published = float(figure) * 1e9
    return abs(count - published) < max(0.01 * published, last_digit)


@pytest.mark.parametrize("name", sorted(MOE_PUBLISHED))
def test_moe_total_and_activated_parameter_counts_match_model_card(results, name):
    total, activated = MOE_PUBLISHED[name]
    counts = results["parameter_counts"][name]
    assert matches_card(counts["total"], total), counts
    assert matches_card(counts["activated"], activated), counts
    assert counts["activated"] < counts["total"] / 4


def test_dense_models_activate_every_parameter(results):
    assert all(counts["activated"] == counts["total"] for name, counts in results["parameter_counts"].items()
               if not PRESETS[name].is_moe)


def dense_qwen1_parameters(hidden, layers, intermediate, vocab):
    ffn = intermediate // 2
    per_layer = 3 * hidden * hidden + 3 * hidden + hidden * hidden + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden  # untied embedding and head, final norm


@pytest.mark.parametrize("name", sorted(QWEN1_CONFIGS))
def test_qwen1_parameter_count_matches_config(results, name):
    expected = dense_qwen1_parameters(*QWEN1_CONFIGS[name])
    assert abs(results["parameter_counts"][name]["total"] - expected) / expected < 0.01


def test_local_spec_checkpoint_keys_are_the_transformer_engine_names(results):
    assert results["checkpoint_keys"] == TE_CHECKPOINT_KEYS


def test_qwen3_checkpoint_keys_are_the_transformer_engine_names(results):
    # TE's spec builds the query and key norms as TE norm modules of their own, like the final norm
    norms = [f"decoder.layers.self_attention.{which}_layernorm.{entry}" for which in "qk"
             for entry in ("weight", "_extra_state")]
    expected = set(TE_CHECKPOINT_KEYS) - {"decoder.layers.self_attention.linear_qkv.bias"} | set(norms)
    assert results["qwen3_checkpoint_keys"] == sorted(expected)


def test_sdpa_attention_equals_megatron_dot_product_attention(results):
    check = results["sdpa_vs_megatron"]
    assert check["shape_equal"]
    assert check["max_diff"] < 1e-5


def test_packed_documents_attend_only_within_themselves(results):
    assert results["packed_attention"]["max_diff"] < 1e-5


def test_packed_documents_with_padding_between_them(results):
    assert results["packed_attention"]["padded_max_diff"] < 1e-5


def test_packed_model_logits_equal_each_document_alone(results):
    check = results["packed_model"]
    assert check["logit_scale"] > 0.1  # the comparison is not between near-zero logits
    assert check["max_diff"] < 1e-5


def test_packed_attention_runs_one_fused_kernel_call_per_document_and_layer(results):
    check = results["packed_kernel_calls"]
    assert check["documents"] >= 3
    calls = check["calls"]
    assert len(calls) == PRESETS["tiny"].num_layers * check["documents"]
    assert {call["kind"] for call in calls} == {"sdpa"}
    # SDPBackend.MATH is 0: the unfused kernel that holds the whole score matrix in float32
    assert [call["backend"] for call in calls if call["backend"] == 0] == []
    assert {call["dims"] for call in calls} == {4}


def test_attention_dropout_only_in_training_and_reproducible(results):
    check = results["dropout"]
    assert check["eval_equals_no_dropout"] == 0.0
    assert check["train_differs"] > 1e-2
    assert check["train_repeats"] == 0.0


def test_padded_vocabulary_is_masked_out_of_the_softmax(results):
    check = results["padded_vocab"]
    assert check["rows"] == 1024
    assert check["padded_logits_all_neg_inf"]
    assert check["loss_max_diff"] < 1e-5


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recomputation_with_dropout_reproduces_gradients(results, granularity):
    check = results["recompute"]
    assert check["gradient_scale"] > 1e-3
    assert check[granularity] == 0.0


def test_gpu_kernel_fusions_compile_and_match_the_unfused_layers(results):
    check = results["fused_kernels"]
    assert check["compiled_graphs"] >= 3  # SwiGLU, bias-dropout-add and RoPE went through torch.compile
    # models/rope.py's RoPE served q and k of every layer, padded and packed
    layers = PRESETS["tiny"].num_layers
    assert check["rope_calls"] == {"bshd": 2 * layers, "thd": 2 * layers}
    assert check["gradient_scale"] > 1e-3
    assert check["loss_diff"] < 1e-6
    assert check["grad_max_diff"] < 1e-5 * check["gradient_scale"]
