"""Layer specs: which modules make up a Qwen decoder, with or without Transformer Engine.

``"te"`` is megatron-core's Transformer Engine spec, unchanged (fused attention, bf16, FP8).
``"local"`` is megatron-core's local spec with our ``SDPAttention`` as core attention and our
``RMSNorm`` in place of the torch-norm fallback; it runs on GPUs without TE and on the CPU.
Qwen3's query and key norms (``TransformerConfig.qk_layernorm``) are part of either spec.
Both name their checkpoint entries alike (the local spec's key map renames the norms into the TE
linear layers' names), so a checkpoint saved with one loads with the other.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.models.local_modules import RMSNorm, SDPAttention, StandaloneRMSNorm

LAYER_IMPLS = ("local", "te")


def transformer_engine_available() -> bool:
    return gpt_layer_specs.HAVE_TE


def default_layer_impl() -> str:
    """Transformer Engine's layers on a GPU that has it, megatron's local spec with ours elsewhere."""
    return "te" if torch.cuda.is_available() and transformer_engine_available() else "local"


def local_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's local GPT layer with SDPA core attention and a sequence-parallel RMSNorm."""
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = StandaloneRMSNorm
    return spec


def te_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    if not transformer_engine_available():
        raise RuntimeError("layer_impl='te' needs Transformer Engine, which does not import here; use 'local'")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def decoder_spec(
    config: TransformerConfig, layer_impl: str, vp_stage: int | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The ``transformer_layer_spec`` argument of ``GPTModel`` for this pipeline stage."""
    if layer_impl == "te":
        return te_layer_spec(config.qk_layernorm)  # the block adds TE's own final norm
    if layer_impl != "local":
        raise ValueError(f"layer_impl must be one of {LAYER_IMPLS}, not {layer_impl!r}")
    return TransformerBlockSubmodules(
        layer_specs=[local_layer_spec(config.qk_layernorm)] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=StandaloneRMSNorm,
    )
