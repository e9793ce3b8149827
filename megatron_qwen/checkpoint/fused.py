"""How megatron-core fuses Qwen's projections into single tensors.

``linear_qkv`` holds, for each query group in turn, that group's query heads, then its key head,
then its value head (rows of ``head_dim`` each); tensor parallelism splits it by whole groups.
``linear_fc1`` holds the SwiGLU gate rows first, then the up rows. Both conventions hold for
weights (rows x hidden) and biases (rows) alike, since only the first dimension is rearranged.
"""
from __future__ import annotations

import torch

from megatron_qwen.models.presets import QwenConfig


def interleave_qkv(cfg: QwenConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """megatron's ``linear_qkv`` from separate query, key and value projections (all heads each)."""
    groups, head_dim = cfg.num_query_groups, cfg.kv_channels
    heads_per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, heads_per_group * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(cfg: QwenConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections (heads contiguous in each) from megatron's ``linear_qkv``."""
    groups, head_dim = cfg.num_query_groups, cfg.kv_channels
    heads_per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = per_group.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron's ``linear_fc1``: the gate rows, then the up rows."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) from megatron's ``linear_fc1``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
