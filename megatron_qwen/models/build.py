"""From a ``QwenConfig`` to megatron-core's ``TransformerConfig`` and ``GPTModel``.

Qwen in megatron-core terms: RMSNorm, SwiGLU (``gated_linear_unit`` with SiLU; ``linear_fc1`` holds
the gate rows first), no bias except on the QKV projection of Qwen and Qwen2 (``add_qkv_bias``), per-head
RMSNorm of queries and keys for Qwen3 (``qk_layernorm``; heads of the preset's ``kv_channels``), rotary
position embedding with the preset's base and no learned positions, tied or untied output layer without
bias. Parallel sizes come from ``megatron.core.parallel_state``, so ``platform.distributed.initialize``
runs first.

Mixtures of experts (``presets`` module docstring) use megatron-core's MoE layers: ``moe_router_topk`` experts
per token; Qwen3-MoE's routing (softmax over all experts, top-k, renormalized) is megatron's default, Qwen2-MoE's
(softmax over all experts, top-k, not renormalized) is ``moe_router_pre_softmax``; Qwen2-MoE's shared expert has
megatron's sigmoid gate (``moe_shared_expert_gate``). Tokens go to the experts with megatron's ``allgather``
dispatcher unless an override names another (the trainer's choice: ``models/chunks.py``); no token is ever dropped
(no capacity factor).

Embedding rows: Qwen's published row counts (151936, 152064) are multiples of 128, so every
power-of-two TP size divides them and they are kept as they are; the softmax then runs over the
same rows as in ``transformers``. A vocabulary that is not a multiple of 128 is padded up to one: the
row count stays the same at every TP size, so checkpoints keep one shape, and the padded rows are kept
out of the softmax (``models/output_loss.py``, whose ``QwenGPTModel`` also computes the training loss
without materializing the logits of the whole micro-batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.models.output_loss import QwenGPTModel
from megatron_qwen.models.presets import QwenConfig
from megatron_qwen.models.rope import provide_fused_rope
from megatron_qwen.models.spec import decoder_spec

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(cfg: QwenConfig, tp: int) -> int:
    """Embedding rows of the megatron model: the published count, or the next multiple of 128."""
    rows = -(-cfg.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if rows % tp:
        raise ValueError(
            f"tensor-parallel size {tp} does not divide the {rows} embedding rows of {cfg.name}; "
            f"use a power of two up to {VOCAB_PAD_MULTIPLE}"
        )
    return rows


def transformer_config(
    cfg: QwenConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    attention_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    cpu: bool | None = None,
    **overrides,
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``cfg`` at the current parallel layout.

    ``cpu=None`` means: CPU when no GPU is visible. ``overrides`` go to ``TransformerConfig`` as they
    are (e.g. fusions or FP8 settings on a GPU); ``apply_rope_fusion`` uses Transformer Engine's RoPE
    kernels where TE is installed and the compiled ones of ``models/rope.py`` elsewhere.
    """
    if cpu is None:
        cpu = not torch.cuda.is_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    fields = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm,
        attention_dropout=attention_dropout,
        hidden_dropout=hidden_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype if pp > 1 else None,
        use_cpu_initialization=cpu,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        # gloo does not keep the order of the sends and receives in one batch between a pair of
        # ranks; with the interleaved schedule batched p2p then mixes up microbatches on the CPU
        batch_p2p_comm=not cpu,
    )
    if cfg.is_moe:
        fields.update(moe_fields(cfg))
    fields.update(overrides)
    if fields.get("apply_rope_fusion"):
        provide_fused_rope()
    return TransformerConfig(**fields)


def moe_fields(cfg: QwenConfig) -> dict:
    """The ``TransformerConfig`` fields of a mixture of experts at the current expert-parallel layout."""
    shared = cfg.moe_shared_expert_ffn_hidden_size
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_router_pre_softmax=not cfg.moe_norm_topk_prob,
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,
        moe_layer_freq=[int(cfg.is_moe_layer(index)) for index in range(cfg.num_layers)],
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def build_model(
    cfg: QwenConfig,
    *,
    layer_impl: str = "local",
    config: TransformerConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides,
) -> QwenGPTModel:
    """This rank's part of the Qwen model (its pipeline stage and tensor-parallel shard).

    ``config_overrides`` are ``transformer_config`` arguments, used when ``config`` is not given.
    """
    if config is None:
        config = transformer_config(cfg, **config_overrides)
    elif config_overrides:
        raise ValueError(f"pass either config or config overrides, not both: {sorted(config_overrides)}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    rows = padded_vocab_size(cfg, config.tensor_model_parallel_size)
    return QwenGPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(config, layer_impl, vp_stage),
        vocab_size=rows,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_base,
        vp_stage=vp_stage,
        real_vocab_size=cfg.vocab_size,
    )


def gather_logits(logits: torch.Tensor, cfg: QwenConfig) -> torch.Tensor:
    """The full-vocabulary logits ``[b, s, vocab_size]`` from the last stage's tensor-parallel shards.

    ``GPTModel`` returns each rank's slice of the vocabulary; this gathers them and drops padding.
    """
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., : cfg.vocab_size]
