"""The Qwen2 / Qwen2.5 Hugging Face layout (``Qwen2ForCausalLM``): tensor names and ``config.json``.

Separate ``q_proj``/``k_proj``/``v_proj`` (with bias; grouped-query attention) are interleaved per
query group into megatron's ``linear_qkv``; ``gate_proj`` and ``up_proj`` become ``linear_fc1``,
gate first. Tied checkpoints have no ``lm_head.weight`` (some publish it anyway; it is then ignored).
``transformers`` represents first-generation Qwen with this layout too (one key/value head per
query head), so ``mcore-to-hf --format qwen2`` works for either generation. Qwen3 uses the same names
without the biases and with per-head query and key norms (``hf_qwen3``, built on ``layer_entries``).
"""
from __future__ import annotations

from typing import Iterator

import torch

from megatron_qwen.checkpoint import fused
from megatron_qwen.checkpoint.hf_chat import ENDOFTEXT_ID, IM_END_ID
from megatron_qwen.checkpoint.mapping import (Entry, MegatronLayer, gate_up, model_entries, rename, require_attention,
                                              require_experts)
from megatron_qwen.models.presets import QwenConfig

FORMAT = "qwen2"


def entries(cfg: QwenConfig) -> Iterator[Entry]:
    """The mapping table for ``cfg``, in checkpoint order."""
    require_attention(cfg, qk_norm=False, layout="Qwen2ForCausalLM", use_instead="qwen3")
    require_experts(cfg, moe=False, layout="Qwen2ForCausalLM")
    yield from model_entries(cfg, "model.embed_tokens.weight", "model.norm.weight", layer_entries)


def layer_entries(cfg: QwenConfig, index: int) -> Iterator[Entry]:
    """One decoder layer's entries in the ``model.layers.N`` names, with the QKV bias if ``cfg`` has one and
    the query/key norms if it has them."""
    yield from attention_entries(cfg, index)
    yield from dense_mlp_entries(index)


def attention_entries(cfg: QwenConfig, index: int) -> Iterator[Entry]:
    """A layer's entries up to its MLP: the norms before attention and before the MLP, and the attention."""
    hf = f"model.layers.{index}."
    layer = MegatronLayer(index)
    yield rename(layer.input_norm, hf + "input_layernorm.weight")
    parts = [(layer.qkv_weight, "weight")] + ([(layer.qkv_bias, "bias")] if cfg.qkv_bias else [])
    for megatron, part in parts:
        yield Entry(
            megatron,
            tuple(f"{hf}self_attn.{p}_proj.{part}" for p in "qkv"),
            fuse=lambda qkv: fused.interleave_qkv(cfg, *qkv),
            split=lambda tensor: fused.split_qkv(cfg, tensor),
        )
    if cfg.qk_norm:
        yield rename(layer.q_norm, hf + "self_attn.q_norm.weight")
        yield rename(layer.k_norm, hf + "self_attn.k_norm.weight")
    yield rename(layer.attention_out, hf + "self_attn.o_proj.weight")
    yield rename(layer.mlp_norm, hf + "post_attention_layernorm.weight")


def dense_mlp_entries(index: int) -> Iterator[Entry]:
    hf, layer = f"model.layers.{index}.", MegatronLayer(index)
    yield gate_up(layer.fc1, gate=hf + "mlp.gate_proj.weight", up=hf + "mlp.up_proj.weight")
    yield rename(layer.fc2, hf + "mlp.down_proj.weight")


def hf_config(cfg: QwenConfig, dtype: torch.dtype) -> dict:
    """``config.json`` for ``Qwen2ForCausalLM``; the RoPE base is written both ways transformers reads it."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tied_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
