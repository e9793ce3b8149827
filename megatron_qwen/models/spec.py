"""Layer specs: which modules make up a Qwen decoder, with or without Transformer Engine.

``"te"`` is megatron-core's Transformer Engine spec, unchanged (fused attention, bf16, FP8).
``"local"`` is megatron-core's local spec with our ``SDPAttention`` as core attention and our
``RMSNorm`` in place of the torch-norm fallback; it runs on GPUs without TE and on the CPU.
Qwen3's query and key norms (``TransformerConfig.qk_layernorm``) are part of either spec.
Both name their checkpoint entries alike (the local spec's key map renames the norms into the TE
linear layers' names), so a checkpoint saved with one loads with the other.

Mixture-of-experts layers are megatron-core's ``MoELayer`` from the same spec functions: experts as
``SequentialMLP`` (one local MLP per expert) in the local spec, as Transformer Engine's grouped linear
(``TEGroupedMLP``) in the TE spec, with megatron's shared expert and router (``models/router.py``: its losses
weighted per supervised token, its load counted). Their pre-MLP norm stays a module of
its own in both (there is no single linear layer to fuse it into). Which layers are sparse follows
``TransformerConfig.moe_layer_freq`` (a 0/1 list per layer, ``models/build.py``).
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.models.local_modules import RMSNorm, SDPAttention, StandaloneRMSNorm
from megatron_qwen.models.router import QwenRouter

LAYER_IMPLS = ("local", "te")


def transformer_engine_available() -> bool:
    return gpt_layer_specs.HAVE_TE


def default_layer_impl() -> str:
    """Transformer Engine's layers on a GPU that has it, megatron's local spec with ours elsewhere."""
    return "te" if torch.cuda.is_available() and transformer_engine_available() else "local"


def local_layer_spec(qk_layernorm: bool = False, num_experts: int | None = None) -> ModuleSpec:
    """megatron-core's local GPT layer with SDPA core attention and a sequence-parallel RMSNorm; with
    ``num_experts``, a mixture-of-experts layer (``SequentialMLP`` experts)."""
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm", qk_layernorm=qk_layernorm
    )
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if num_experts:  # a module of its own, named as TE's MoE layer names it (module docstring)
        del spec.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."]
        spec.submodules.pre_mlp_layernorm = StandaloneRMSNorm
        spec.submodules.mlp.submodules.router = QwenRouter
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = StandaloneRMSNorm
    return spec


def te_layer_spec(qk_layernorm: bool = False, num_experts: int | None = None) -> ModuleSpec:
    if not transformer_engine_available():
        raise RuntimeError("layer_impl='te' needs Transformer Engine, which does not import here; use 'local'")
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=bool(num_experts), qk_layernorm=qk_layernorm
    )
    if num_experts:
        spec.submodules.mlp.submodules.router = QwenRouter
    return spec


def decoder_spec(
    config: TransformerConfig, layer_impl: str, vp_stage: int | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The ``transformer_layer_spec`` argument of ``GPTModel`` for this pipeline stage."""
    if layer_impl not in LAYER_IMPLS:
        raise ValueError(f"layer_impl must be one of {LAYER_IMPLS}, not {layer_impl!r}")
    if layer_impl == "te" and not config.num_moe_experts:
        return te_layer_spec(config.qk_layernorm)  # the block adds TE's own final norm
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = range(first, first + get_num_layers_to_build(config, vp_stage=vp_stage))
    layer_spec = te_layer_spec if layer_impl == "te" else local_layer_spec
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(config.qk_layernorm, _experts_of_layer(config, index)) for index in layers],
        layer_norm=_te_norm() if layer_impl == "te" else StandaloneRMSNorm,
    )


def _experts_of_layer(config: TransformerConfig, index: int) -> int | None:
    """The routed experts of layer ``index`` (from 0), None for a dense layer."""
    if not config.num_moe_experts:
        return None
    pattern = config.moe_layer_freq  # a list where models/build.py made the config
    sparse = pattern[index] if isinstance(pattern, list) else index % pattern == 0
    return config.num_moe_experts if sparse else None


def _te_norm():
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm
