"""The check that a loaded training state is finite: model weights, the optimizer's float32 main weights and its Adam
moments. A NaN or Inf in any of them would train on garbage (or diverge at once, after the resume has overwritten
the good iterations); a checkpoint's digests (``checkpoint/manifest.py``) cannot tell a damaged file from a state
that was saved non-finite. One ``isfinite`` reduction per tensor at load, and one gather of the result.
"""
from __future__ import annotations

import torch

from megatron_qwen.training.optimizer import _parts

MOMENTS = ("exp_avg", "exp_avg_sq")


def first_non_finite(ddp_chunks: list, optimizer=None) -> str | None:
    """What holds the first non-finite value on this rank (``None``: everything is finite)."""
    names = {param: name for chunk in ddp_chunks for name, param in chunk.module.named_parameters()}
    tensors = [(f"model weight {name}", param) for param, name in names.items()]
    if optimizer is not None:
        tensors += list(_optimizer_tensors(optimizer, names))
    return next((what for what, tensor in tensors if not bool(torch.isfinite(tensor).all())), None)


def _optimizer_tensors(optimizer, names: dict):
    """``(description, tensor)`` of each float32 main weight and Adam moment of megatron's ``optimizer``."""
    for part in _parts(optimizer):
        inner = getattr(part, "optimizer", None)
        for main, name in _main_params(part, names) if inner is not None else []:
            yield f"optimizer float32 main weight of {name}", main
            state = inner.state.get(main, {})
            yield from ((f"optimizer Adam {moment} of {name}", state[moment]) for moment in MOMENTS if moment in state)


def _main_params(part, names: dict):
    """``(main parameter, model parameter name)`` for the parameters that megatron optimizer ``part`` steps: the
    distributed optimizer's shards by its index map, a float16 optimizer's float32 copies, or the parameters
    themselves."""
    groups = part.optimizer.param_groups
    index_map = getattr(part, "model_param_group_index_map", None)
    if index_map is not None:
        return [(groups[group]["params"][order], names.get(model, "?")) for model, (group, order) in index_map.items()]
    mains = {id(getattr(model, "main_param", model)): name for model, name in names.items()}
    return [(main, mains.get(id(main), "?")) for group in groups for main in group["params"]]
