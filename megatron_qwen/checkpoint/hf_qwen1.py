"""The first-generation Qwen layout (``QWenLMHeadModel``): tensor names and ``config.json``.

Facts from Qwen's published modeling code: ``attn.c_attn`` is ``Linear(H, 3H)`` with bias whose
output rows are all queries, then all keys, then all values (heads contiguous in each; one key/value
head per query head), while megatron's ``linear_qkv`` wants each head's query, key and value
together. The MLP computes ``c_proj(w1(x) * silu(w2(x)))``: ``w2`` is the gate and ``w1`` the up
projection, and megatron's ``linear_fc1`` holds the gate first. ``intermediate_size`` in
``config.json`` is twice the per-branch FFN size. Only ``c_attn`` has a bias.
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_qwen.checkpoint import fused
from megatron_qwen.checkpoint.mapping import (Entry, MegatronLayer, gate_up, model_entries, rename, require_attention,
                                              require_experts)
from megatron_qwen.models.presets import QwenConfig

FORMAT = "qwen"


def entries(cfg: QwenConfig) -> Iterator[Entry]:
    """The mapping table for ``cfg``, in checkpoint order."""
    require_attention(cfg, qk_norm=False, layout="the first-generation layout", use_instead="qwen3")
    require_experts(cfg, moe=False, layout="the first-generation layout")
    if cfg.num_query_groups != cfg.num_attention_heads:
        raise ValueError(
            f"the first-generation layout has one key/value head per query head; {cfg.name} has "
            f"{cfg.num_query_groups} query groups for {cfg.num_attention_heads} heads: use --format qwen2"
        )
    yield from model_entries(cfg, "transformer.wte.weight", "transformer.ln_f.weight", _layer_entries)


def _layer_entries(cfg: QwenConfig, index: int) -> Iterator[Entry]:
    hf = f"transformer.h.{index}."
    layer = MegatronLayer(index)
    yield rename(layer.input_norm, hf + "ln_1.weight")
    for megatron, part in ((layer.qkv_weight, "weight"), (layer.qkv_bias, "bias")):
        yield Entry(
            megatron,
            (f"{hf}attn.c_attn.{part}",),
            fuse=lambda c_attn: fused.interleave_qkv(cfg, *c_attn[0].chunk(3, dim=0)),
            split=lambda qkv: (torch.cat(fused.split_qkv(cfg, qkv), dim=0),),
        )
    yield rename(layer.attention_out, hf + "attn.c_proj.weight")
    yield rename(layer.mlp_norm, hf + "ln_2.weight")
    yield gate_up(layer.fc1, gate=hf + "mlp.w2.weight", up=hf + "mlp.w1.weight")
    yield rename(layer.fc2, hf + "mlp.c_proj.weight")


def hf_config(cfg: QwenConfig, dtype: torch.dtype) -> dict:
    """``config.json`` in the published first-generation form (``trust_remote_code`` model code)."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 2 * cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "seq_length": cfg.max_position_embeddings,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "rotary_emb_base": cfg.rope_base,
        "rotary_pct": 1.0,
        "no_bias": True,
        "tie_word_embeddings": cfg.tied_embeddings,
        "scale_attn_weights": True,
        "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tokenizer_class": "QWenTokenizer",
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "fp32": dtype == torch.float32,
    }
