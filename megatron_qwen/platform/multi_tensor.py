"""The gradient norm and gradient scaling of megatron's optimizer, when neither Transformer Engine nor apex is installed.

megatron-core computes the global gradient norm for clipping, scales the gradients by the clipping coefficient and
copies float32 main weights into bf16 model weights through a "multi-tensor applier" (one kernel over a list of
tensors). Without Transformer Engine or apex it falls back to ``megatron.core.utils.local_multi_tensor_l2_norm``,
which builds a tensor from a Python list of per-tensor norms (a device-to-host copy, hence a host sync, per
gradient tensor: ~200 per update for Qwen2.5-1.5B, ~290 for 14B), and ``local_multi_tensor_scale``, which allocates
a temporary per tensor. ``provide_foreach_kernels`` replaces both with torch's multi-tensor ``_foreach`` ops: the norm
stays on the device until megatron reads the total once per update, and scaling works in place. The same code runs on
the CPU and on GPUs, with the same results as megatron's fallbacks.
"""
from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The l2 norm over every tensor of ``tensor_lists[0]``, as a one-element float32 tensor on their device (the
    signature of ``amp_C.multi_tensor_l2norm``; no per-tensor norms)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale: float) -> None:
    """``target = source * scale`` for each pair of ``tensor_lists`` (the signature of ``amp_C.multi_tensor_scale``):
    in place when the lists are the same tensors (clipping), else a copy that may change dtype."""
    sources, targets = tensor_lists
    if all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    else:
        torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def provide_foreach_kernels() -> None:
    """Puts ``foreach_l2_norm`` and ``foreach_scale`` where megatron's optimizer took its local fallbacks
    (idempotent; nothing changes where Transformer Engine's or apex's kernels were found)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
