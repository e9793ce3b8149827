"""The two modules of ours inside the local (non-Transformer-Engine) layer spec.

``SDPAttention`` replaces megatron-core's unfused ``DotProductAttention``: it calls
``torch.nn.functional.scaled_dot_product_attention`` with 4-D ``[batch, heads, len, dim]`` inputs, the
only shape its fused kernels (flash, memory-efficient, cuDNN) take: a 3-D call runs the math kernel,
which holds the S x S score matrix in float32. It supports the causal mask, packed sequences in THD
format (one call per document of the pack, so attention stays inside each), grouped-query attention
(without repeating keys and values where the chosen kernel takes them grouped) and attention dropout. ``RMSNorm`` is Qwen's RMSNorm and, unlike megatron's torch-norm fallback, works with
sequence parallelism.

Checkpoint keys: Transformer Engine's attention and final norm carry an ``_extra_state`` entry (FP8
metadata). Ours carry an empty one under the same name, so a checkpoint written with either spec has
the same keys and loads with the other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class EmptyExtraState:
    """Mixin: an ``_extra_state`` checkpoint entry under the name Transformer Engine uses, holding nothing."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state) -> None:
        """Transformer Engine's FP8 metadata means nothing without Transformer Engine; it is dropped."""


class SDPAttention(EmptyExtraState, MegatronModule):
    """Core attention: ``[s, b, heads, dim]`` (or THD ``[t, heads, dim]``) q/k/v in, ``[s, b, heads*dim]`` out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use the TE spec")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if self.training and self.dropout_p > 0 and not self.config.sequence_parallel:
            # Heads are split across tensor-parallel ranks, so each rank draws its own dropout
            # mask from the model-parallel RNG state, as megatron's DotProductAttention does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, causal, packed_seq_params)
        return self._attend(query, key, value, attention_mask, causal, packed_seq_params)

    def _attend(self, query, key, value, attention_mask, causal, packed_seq_params):
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if attention_mask is not None:
                raise ValueError("packed (THD) attention takes cu_seqlens, not an attention mask")
            return self._attend_packed(query, key, value, packed_seq_params, causal)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # megatron's masks are True where attention is forbidden; SDPA's are True where allowed.
        # A given mask already contains the causal part (as in megatron's own attention).
        mask = None if attention_mask is None else ~attention_mask
        out = self._sdpa(q, k, v, mask=mask, causal=causal and mask is None)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _attend_packed(self, query, key, value, params: PackedSeqParams, causal):
        """Attends within each document of a pack: ``[t, h, d]`` in, ``[t, h*d]`` out (zeros on padding
        between documents, where ``cu_seqlens_q_padded`` places some)."""
        starts = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        lengths = params.cu_seqlens_q.diff()
        if params.cu_seqlens_kv is not None and not torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q):
            raise ValueError("packed self-attention needs cu_seqlens_kv equal to cu_seqlens_q")
        # concatenated, not written by index into one output: each indexed write would copy the whole
        # output gradient again in the backward
        pieces, end = [], 0
        for start, length in zip(starts[:-1].tolist(), lengths.tolist()):
            pieces += self._gap(query, value, start - end)
            doc = slice(start, start + length)
            q, k, v = (t[doc].transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, h, len, d]
            pieces.append(self._sdpa(q, k, v, mask=None, causal=causal)[0].transpose(0, 1))
            end = start + length
        pieces += self._gap(query, value, query.shape[0] - end)
        return torch.cat(pieces).reshape(query.shape[0], -1)

    @staticmethod
    def _gap(query, value, rows: int) -> list[torch.Tensor]:
        """The output of ``rows`` padding positions outside every document (zeros), as a list of pieces."""
        return [query.new_zeros(rows, query.shape[1], value.shape[2])] if rows else []

    def _sdpa(self, q, k, v, mask, causal):
        """``[b, heads, len, d]`` attention; keys and values may have fewer heads (grouped-query attention)."""
        options = dict(
            attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0, is_causal=causal, scale=self.softmax_scale
        )
        grouped = q.shape[1] != k.shape[1]
        if grouped and not _fused_kernel_takes_groups(q, k, v, options):
            # repeated keys/values cost O(s * heads) memory and keep the fused kernels eligible
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            grouped = False
        return F.scaled_dot_product_attention(q, k, v, **options, **({"enable_gqa": True} if grouped else {}))


def _fused_kernel_takes_groups(q, k, v, options: dict) -> bool:
    """Whether SDPA would run a fused kernel on grouped keys/values as they are (``enable_gqa``). Not every kernel
    takes them in every torch version (e.g. CUDA's memory-efficient one for float32); where none does, SDPA would
    fall back to the math kernel, so the caller repeats them instead. False where torch has no ``enable_gqa``."""
    try:
        backend = torch._fused_sdp_choice(q, k, v, **options, enable_gqa=True)
    except TypeError:
        return False
    return backend != SDPBackend.MATH.value


class RMSNorm(torch.nn.Module):
    """Qwen's RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))``, normalized in float32.

    With sequence parallelism each tensor-parallel rank sees a different slice of the sequence, so
    the weight's gradient must be summed over the tensor-parallel group; the ``sequence_parallel``
    attribute tells megatron's gradient finalization to do that.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        **unused_norm_options,
    ):
        super().__init__()
        self.eps = eps
        # like megatron's own layers: on the GPU unless CPU initialization is asked for (None keeps
        # an enclosing device context, e.g. the meta device, in charge)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm normalizes in float32 and, on CUDA, runs one fused kernel each way (the Python
        # formula is ~7 kernels forward and ~12 backward, 57 times per pass). It applies the weight before the
        # one rounding to bf16, where Qwen's reference rounds first: at most one bf16 ulp apart, equal in fp32.
        return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.eps)


class StandaloneRMSNorm(EmptyExtraState, RMSNorm):
    """A norm that Transformer Engine's spec builds as a module of its own, with an ``_extra_state`` entry:
    the decoder's last norm, Qwen3's query and key norms, and the norm before a mixture-of-experts MLP.

    The norms before attention and a dense MLP have none: their keys are renamed into the TE linear layers' names.
    """
