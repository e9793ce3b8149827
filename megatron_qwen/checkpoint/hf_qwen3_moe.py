"""The Qwen3-MoE Hugging Face layout (``Qwen3MoeForCausalLM``): tensor names and ``config.json``.

Qwen3's attention (query/key norms, no biases, ``head_dim`` of its own) with Qwen2-MoE's expert and router names
(``hf_qwen2_moe``, which also reads ``transformers``' fused in-memory expert tensors), and no shared expert.
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_qwen.checkpoint import hf_qwen2_moe, hf_qwen3
from megatron_qwen.checkpoint.mapping import Entry, model_entries, require_attention, require_experts
from megatron_qwen.models.presets import QwenConfig

FORMAT = "qwen3_moe"


def entries(cfg: QwenConfig) -> Iterator[Entry]:
    """The mapping table for ``cfg``, in checkpoint order."""
    require_attention(cfg, qk_norm=True, layout="Qwen3MoeForCausalLM", use_instead=hf_qwen2_moe.FORMAT)
    require_experts(cfg, moe=True, layout="Qwen3MoeForCausalLM")
    if cfg.moe_shared_expert_ffn_hidden_size is not None:
        raise ValueError(f"{cfg.name} has a shared expert, which Qwen3MoeForCausalLM cannot hold; "
                         f"use --format {hf_qwen2_moe.FORMAT}")
    yield from model_entries(cfg, "model.embed_tokens.weight", "model.norm.weight", hf_qwen2_moe.layer_entries)


def hf_config(cfg: QwenConfig, dtype: torch.dtype) -> dict:
    """``config.json`` for ``Qwen3MoeForCausalLM``: Qwen3's fields and the experts'."""
    return {
        **hf_qwen3.hf_config(cfg, dtype),
        **hf_qwen2_moe.moe_config_fields(cfg),
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
    }
