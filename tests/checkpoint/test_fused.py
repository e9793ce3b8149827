"""megatron-core's fused tensor conventions, on hand-written rows (one row per head, value = label)."""
import torch

from megatron_qwen.checkpoint import fused
from megatron_qwen.models.presets import QwenConfig

# 4 query heads in 2 groups, head_dim 1: megatron's linear_qkv rows are q0 q1 k0 v0 | q2 q3 k1 v1
GQA = QwenConfig("t", "qwen2", 4, 1, 4, 2, 8, 16, 1e6, 1e-6, False)
Q, K, V = [0, 1, 2, 3], [10, 11], [20, 21]
MEGATRON_QKV = [0, 1, 10, 20, 2, 3, 11, 21]


def rows(values, width=3):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, width)


def test_qkv_rows_are_grouped_per_query_group():
    qkv = fused.interleave_qkv(GQA, rows(Q), rows(K), rows(V))
    assert qkv[:, 0].tolist() == MEGATRON_QKV
    bias = fused.interleave_qkv(GQA, torch.tensor(Q, dtype=torch.float32), torch.tensor(K, dtype=torch.float32),
                                torch.tensor(V, dtype=torch.float32))
    assert bias.tolist() == MEGATRON_QKV


def test_split_qkv_inverts_the_grouping():
    q, k, v = fused.split_qkv(GQA, rows(MEGATRON_QKV))
    assert (q[:, 0].tolist(), k[:, 0].tolist(), v[:, 0].tolist()) == (Q, K, V)


def test_multi_head_attention_has_one_key_and_value_per_head():
    mha = QwenConfig("t", "qwen", 4, 1, 2, 2, 8, 16, 1e4, 1e-6, False)
    # head_dim 2: q = [q0a q0b q1a q1b], megatron rows: q0a q0b k0a k0b v0a v0b | q1a q1b k1a k1b v1a v1b
    qkv = fused.interleave_qkv(mha, rows([0, 1, 2, 3]), rows([10, 11, 12, 13]), rows([20, 21, 22, 23]))
    assert qkv[:, 0].tolist() == [0, 1, 10, 11, 20, 21, 2, 3, 12, 13, 22, 23]


def test_fc1_holds_gate_rows_first():
    gate, up = rows([1, 2]), rows([7, 8])
    fc1 = fused.fuse_gate_up(gate, up)
    assert fc1[:, 0].tolist() == [1, 2, 7, 8]
    assert [t[:, 0].tolist() for t in fused.split_gate_up(fc1)] == [[1, 2], [7, 8]]
