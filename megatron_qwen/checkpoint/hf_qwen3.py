"""The Qwen3 (dense) Hugging Face layout (``Qwen3ForCausalLM``): tensor names and ``config.json``.

Qwen2's names (``hf_qwen2``) without the QKV biases, plus each layer's ``self_attn.q_norm`` and
``self_attn.k_norm`` (one RMSNorm weight of ``head_dim`` each, applied to every query or key head before
the rotary embedding), which are megatron's ``q_layernorm`` and ``k_layernorm``. ``config.json`` states
``head_dim`` (128 in every published size), which need not be ``hidden_size / num_attention_heads``.
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_qwen.checkpoint import hf_qwen2
from megatron_qwen.checkpoint.mapping import Entry, model_entries, require_attention, require_experts
from megatron_qwen.models.presets import QwenConfig

FORMAT = "qwen3"


def entries(cfg: QwenConfig) -> Iterator[Entry]:
    """The mapping table for ``cfg``, in checkpoint order."""
    require_attention(cfg, qk_norm=True, layout="Qwen3ForCausalLM", use_instead=hf_qwen2.FORMAT)
    require_experts(cfg, moe=False, layout="Qwen3ForCausalLM")
    yield from model_entries(cfg, "model.embed_tokens.weight", "model.norm.weight", hf_qwen2.layer_entries)


def hf_config(cfg: QwenConfig, dtype: torch.dtype) -> dict:
    """``config.json`` for ``Qwen3ForCausalLM``: Qwen2's fields, the architecture, ``head_dim`` and no biases."""
    return {
        **hf_qwen2.hf_config(cfg, dtype),
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": cfg.kv_channels,
        "attention_bias": False,
    }
