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
    names = {}
    for chunk in ddp_chunks:
        for name, param in chunk.module.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return f"model weight {name}"
            names[param] = name
    for part in _parts(optimizer) if optimizer is not None else []:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for main, name in _main_params(part, names):
            tensors = [("float32 main weight", main)] + [
                (f"Adam {moment}", inner.state[main][moment]) for moment in MOMENTS if moment in inner.state.get(main, {})]
            for what, tensor in tensors:
                if not bool(torch.isfinite(tensor).all()):
                    return f"optimizer {what} of {name}"
    return None


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
