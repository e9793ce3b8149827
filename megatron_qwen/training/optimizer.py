"""megatron-core's DDP wrapper, optimizer and their checkpoint state, set up for the token-weighted SFT loss.

- DDP sums gradients over data-parallel ranks (``average_in_collective=False``) and reduces them in float32;
  ``finalize_model_grads`` then divides by the step's supervised-token count (see ``training/loss.py``).
- The optimizer is megatron's AdamW, optionally the distributed optimizer (state sharded over data-parallel
  ranks). Its Adam kernel: megatron-core 0.16.1 (``megatron/core/optimizer/__init__.py``) takes Transformer
  Engine's ``FusedAdam``, else apex's, and when neither imports it builds ``torch.optim.AdamW`` without a
  ``fused`` argument, which torch runs as its multi-tensor ``foreach`` implementation on a GPU (a per-parameter
  loop on the CPU). ``select_adam_kernel`` then switches that fallback to ``fused=True`` on a GPU (one fused
  kernel per parameter group instead of a dozen ``foreach`` passes over the state); on the CPU it leaves torch's
  default. It runs after building and again after loading a checkpoint, whose saved param groups carry the
  ``fused`` flag of the run that wrote them.
- Without Transformer Engine or apex, gradient norm, clipping and the copy of main weights into bf16 weights run on
  torch's ``_foreach`` ops instead of megatron's per-tensor fallbacks (``platform/multi_tensor.py``).
- Checkpoints of the distributed optimizer use megatron's ``fully_reshardable`` format (gathered on
  data-parallel rank 0 with gloo, restored at any TP/PP/DP layout).

Loading the distributed optimizer's checkpoint on the ``torch.optim.AdamW`` fallback fails in megatron-core
0.16.1 for three reasons, each fixed here by ``_loadable`` without touching megatron's code:

1. ``DistributedOptimizer.state_dict()`` (called while building the state dict to load into) reads Adam's
   per-parameter ``step``, which a fresh torch AdamW does not have yet: the state is created first, zeroed,
   with the step the checkpoint will overwrite (no optimizer step is taken, so no parameter moves).
2. The loaders copy into the main parameters in place outside ``no_grad``; for float32 models those are
   views of leaf parameters that require grad, which autograd refuses: loading runs under ``no_grad``.
3. ``fully_reshardable`` keeps ``step`` in the param groups, not per parameter, yet the per-parameter copy
   expects every state key (``KeyError: 'step'``): the copy skips keys the checkpoint does not hold per
   parameter (``step`` is restored from the param groups by ``load_state_dict`` itself).

And one more, which would break resuming silently: ``load_state_dict`` gives every parameter the *same*
``step`` tensor, which torch AdamW then increments once per parameter at every update, so bias correction
runs ahead after a resume. Each parameter gets its own copy back after loading, where torch keeps it: on the
CPU, or on the parameter's device for the fused kernel (which refuses steps on another device).
"""
from __future__ import annotations

import types

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

from megatron_qwen.platform.multi_tensor import provide_foreach_kernels
from megatron_qwen.training.loss import require_per_token_loss

DISTRIBUTED_OPTIMIZER_FORMAT = {
    "distrib_optim_sharding_type": "fully_reshardable",
    # gather on data-parallel rank 0 over gloo instead of all-gathering the whole state to every rank
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def wrap_ddp(chunks: list, distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """Each model chunk in megatron's DDP, wired into the pipeline schedule (grad finalization, no_sync)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # each gradient bucket's data-parallel reduction starts as soon as the last micro-batch's backward has
        # filled it, hidden behind the rest of the backward instead of run after it
        overlap_grad_reduce=True,
        use_distributed_optimizer=distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk) for chunk in chunks
    ]
    config = chunks[0].config
    require_per_token_loss(config, ddp_config)
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    # the interleaved schedule starts each chunk's reduction when that chunk's last backward is done
    grad_sync = [chunk.start_grad_sync for chunk in wrapped]
    config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return wrapped


def build_optimizer(ddp_chunks: list, settings, precision: str, distributed_optimizer: bool):
    """megatron's AdamW over ``ddp_chunks``; ``settings`` is the run's ``OptimizerSettings``."""
    bf16 = precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    select_adam_kernel(optimizer)
    provide_foreach_kernels()  # gradient norm and clipping without a host sync per tensor
    return optimizer


def _inner(optimizer) -> list:
    """The optimizers megatron's wrappers step (``None`` for a rank without parameters)."""
    return [getattr(part, "optimizer", part) for part in _parts(optimizer)]


def _torch_adams(optimizer) -> list[torch.optim.Adam]:
    """The ``torch.optim.Adam``/``AdamW`` instances inside megatron's optimizer (none with TE's or apex's)."""
    return [adam for adam in _inner(optimizer) if isinstance(adam, torch.optim.Adam)]


def select_adam_kernel(optimizer, fused: bool | None = None) -> None:
    """Runs torch's AdamW fallback fused (``fused=None``: when CUDA is available), else with torch's default,
    and puts each parameter's own ``step`` tensor where that kernel wants it (module docstring)."""
    if fused is None:
        fused = torch.cuda.is_available()
    for adam in _torch_adams(optimizer):
        adam.defaults["fused"] = True if fused else None
        for group in adam.param_groups:
            group["fused"] = adam.defaults["fused"]
            if fused:
                group["foreach"] = None  # torch refuses fused and foreach together
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state:
                    on = param.device if fused or group["capturable"] else torch.device("cpu")
                    state["step"] = state["step"].to(device=on, dtype=torch.float32).clone()


def adam_description(optimizer) -> str:
    """Which Adam implementation steps (for logs and the benchmark): class, and torch's kernel choice."""
    names = []
    for adam in (adam for adam in _inner(optimizer) if adam is not None):
        name = f"{type(adam).__module__}.{type(adam).__qualname__}"
        if isinstance(adam, torch.optim.Adam):
            first = adam.param_groups[0]
            params = [param for group in adam.param_groups for param in group["params"]]
            if first["fused"]:
                kernel = "fused"
            else:
                foreach = first["foreach"]
                if foreach is None:
                    _, foreach = _default_to_fused_or_foreach(params, False, use_fused=False)
                kernel = "foreach" if foreach else "for-loop"
            name += f" ({kernel})"
        names.append(name)
    return ", ".join(dict.fromkeys(names))


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def sharded_state_dict(optimizer, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
    """The optimizer's entry of a distributed checkpoint (to save, or to load into with ``is_loading``)."""
    if is_loading:
        for part in _parts(optimizer):
            _loadable(part)
    return optimizer.sharded_state_dict(
        model_sharded_state_dict, is_loading=is_loading, metadata=DISTRIBUTED_OPTIMIZER_FORMAT
    )


def load_state_dict(optimizer, state: dict) -> None:
    """Restores what ``dist_checkpointing.load`` returned for ``sharded_state_dict(..., is_loading=True)``."""
    with torch.no_grad():  # fix 2 (module docstring)
        optimizer.load_state_dict(state)
    select_adam_kernel(optimizer)  # also fix 4: a step tensor of its own per parameter


def _loadable(part) -> None:
    """Fixes 1 and 3 of the module docstring for the distributed optimizer on torch AdamW."""
    if not isinstance(part, DistributedOptimizer) or HAVE_APEX_OR_TE:
        return
    adam = part.optimizer
    for group in adam.param_groups:
        for param in group["params"]:
            if not adam.state[param]:
                adam.state[param].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                )
    if not getattr(part, "_copies_only_saved_keys", False):
        original = part._set_main_param_and_optimizer_states

        def copy_saved_keys(self, model_param, tensors):
            original(model_param, _with_current_values(self, model_param, tensors))

        part._set_main_param_and_optimizer_states = types.MethodType(copy_saved_keys, part)
        part._copies_only_saved_keys = True


def _with_current_values(part, model_param, tensors: dict) -> dict:
    """``tensors`` completed with the current value of every state key the checkpoint does not hold per
    parameter (torch AdamW's ``step``), so megatron's copy leaves those untouched."""
    group_index, group_order = part.model_param_group_index_map[model_param]
    main_param = part.optimizer.param_groups[group_index]["params"][group_order]
    state = part.optimizer.state[main_param]
    missing = {key: value for key, value in state.items() if key not in tensors}
    return {**tensors, **missing}
