"""Fused rotary position embedding where Transformer Engine is missing: one compiled kernel each way.

megatron-core routes RoPE through Transformer Engine's fused kernels when ``apply_rope_fusion`` is set and
refuses the flag without TE. Its unfused fallback costs about ten memory passes over the queries and keys
of every layer in each direction (cosine and sine of the frequencies cast to the activation dtype, two
products, the rotate-half negation and concatenation, the sum, and a final concatenation with the
non-rotated channels). ``provide_fused_rope`` fills megatron's two dispatch slots
(``rope_utils.fused_apply_rotary_pos_emb`` and ``..._thd``) with ``torch.compile``'d functions, so the
local spec gets a fused RoPE too: one pass over q or k forward and one backward.

Numerics: the rotation runs in float32 and is rounded to the activation dtype once (TE's kernel does the
same); megatron's unfused path rounds the cosine, the sine and each product to bf16 on the way, so in bf16
the two differ by about one unit in the last place, and in float32 only by the order of the additions.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils


# static shapes: a run sees a handful (queries and keys, with and without autograd), each worth its own kernel
@torch.compile(dynamic=False)
def _rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t`` [s, b, h, d] rotated by the angles ``freqs`` [s, 1, 1, r] on its first r channels."""
    rotary_channels = freqs.shape[-1]
    rotated = t[..., :rotary_channels].float()
    first, second = rotated.chunk(2, dim=-1)
    turned = torch.cat((-second, first), dim=-1)
    out = rotated * freqs.cos() + turned * freqs.sin()
    return torch.cat((out.to(t.dtype), t[..., rotary_channels:]), dim=-1)


def fused_rope_bshd(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """TE's ``fused_apply_rotary_pos_emb`` for padded rows (Qwen rotates halves, never interleaved pairs)."""
    if interleaved:
        raise ValueError("the compiled RoPE rotates halves; interleaved rotary channels need Transformer Engine")
    return _rotate(t, freqs)


def fused_rope_thd(
    t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int = 1, cp_rank: int = 0
) -> torch.Tensor:
    """TE's ``fused_apply_rotary_pos_emb_thd`` for packed rows: ``t`` [tokens, h, d], each segment of
    ``cu_seqlens`` rotated from position 0. The local spec keeps ``cu_seqlens`` on the host
    (``training/step.py``), so reading the segment lengths does not wait for the GPU."""
    if cp_size != 1:
        raise ValueError("the compiled RoPE does not split sequences for context parallelism")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    per_token = torch.cat([freqs[:length] for length in lengths])
    return _rotate(t.unsqueeze(1), per_token).squeeze(1)


def provide_fused_rope() -> None:
    """Fill megatron's fused-RoPE slots that Transformer Engine left empty (idempotent)."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope_bshd
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_rope_thd
