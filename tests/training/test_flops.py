"""Model FLOPs per step against a hand count, and Megatron's closed form for a real preset; MFU."""
import dataclasses

import pytest

from megatron_qwen.models.presets import PRESETS
from megatron_qwen.training.flops import H100_SXM_BF16_DENSE_PEAK, forward_flops_per_token, mfu, step_flops


def test_step_flops_match_a_hand_count_of_every_matrix_multiplication():
    # h=8, 2 layers, 2 query heads of size 4 sharing 1 key/value group, SwiGLU width 12, 20 rows, rows of 10.
    tiny = dataclasses.replace(
        PRESETS["tiny"], hidden_size=8, num_layers=2, num_attention_heads=2, num_query_groups=1,
        ffn_hidden_size=12, vocab_size=20,
    )
    qkv = 2 * 8 * (2 * 4 + 2 * 1 * 4)  # [8 x 16] weight: 256
    output_projection = 2 * 8 * 8  # 128
    scores_and_values = 2 * (2 * 10 * 4 * 2)  # Q.K over 10 positions and P.V, 2 heads: 320
    swiglu = 2 * 8 * 24 + 2 * 12 * 8  # gate+up [8 x 24], down [12 x 8]: 576
    logits = 2 * 8 * 20  # 320
    per_token = 2 * (qkv + output_projection + scores_and_values + swiglu) + logits
    assert per_token == 2880
    assert forward_flops_per_token(tiny, seq_length=10) == 2880
    assert step_flops(tiny, seq_length=10, num_tokens=7) == 3 * 7 * 2880


def test_qwen_14b_matches_megatrons_closed_form():
    model, seq, tokens = PRESETS["qwen-14b"], 2048, 128 * 2048
    h, n, g, f, layers, vocab = 5120, 40, 40, 13696, 40, 152064
    megatron = 12 * tokens * layers * h * h * ((1 + g / n + seq / h) + (f / h) * 1.5) + 6 * tokens * h * vocab
    assert step_flops(model, seq, tokens) == pytest.approx(megatron, rel=1e-12)


def test_qwen3_heads_wider_than_hidden_over_heads_are_counted():
    # Qwen3-0.6B: 16 query heads and 8 key/value groups of 128 on a hidden size of 1024 (16 x 128 = 2048)
    model, seq = PRESETS["qwen3-0.6b"], 2048
    weights_per_layer = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072  # q, k and v, o, SwiGLU
    attention = 2 * (2 * seq * 128 * 16)  # Q.K and P.V over the row, 16 heads of 128
    per_token = 28 * (2 * weights_per_layer + attention) + 2 * 1024 * 151936
    assert forward_flops_per_token(model, seq) == per_token


def test_mfu_against_the_h100_peak():
    assert H100_SXM_BF16_DENSE_PEAK == 989e12
    assert mfu(flops=8 * 989e12, seconds=2.0, num_gpus=8) == pytest.approx(0.5)
    assert mfu(flops=3e12, seconds=1.0, num_gpus=1, peak_flops_per_gpu=6e12) == pytest.approx(0.5)


def test_mixture_of_experts_counts_the_experts_a_token_activates():
    # h=8, 3 layers (layer 1 dense, SwiGLU 12), 2 query heads of 4 on 1 group; 6 experts of width 5, 2 per token,
    # a shared expert of width 7 with its gate; 20 rows, rows of 10.
    moe = dataclasses.replace(
        PRESETS["tiny"], generation="qwen2_moe", hidden_size=8, num_layers=3, num_attention_heads=2,
        num_query_groups=1, ffn_hidden_size=12, vocab_size=20, num_experts=6, moe_ffn_hidden_size=5,
        moe_router_topk=2, moe_shared_expert_ffn_hidden_size=7, moe_dense_layers=(1,),
    )
    attention = 256 + 128 + 320  # QKV, output projection, scores and values, as in the dense count above
    dense_mlp = 2 * 8 * 24 + 2 * 12 * 8  # 576
    router = 2 * 8 * 6  # [8 x 6]: 96
    two_experts = 2 * (2 * 8 * 10 + 2 * 5 * 8)  # each: gate+up [8 x 10], down [5 x 8]: 2 x 240
    shared = 2 * 8 * 14 + 2 * 7 * 8 + 2 * 8  # gate+up [8 x 14], down [7 x 8], gate [8 x 1]: 352
    sparse_mlp = router + two_experts + shared  # 928
    per_token = 3 * attention + 2 * sparse_mlp + dense_mlp + 2 * 8 * 20
    assert per_token == 2112 + 1856 + 576 + 320
    assert forward_flops_per_token(moe, seq_length=10) == per_token
    without_shared = dataclasses.replace(moe, moe_shared_expert_ffn_hidden_size=None)
    assert forward_flops_per_token(without_shared, seq_length=10) == per_token - 2 * shared
