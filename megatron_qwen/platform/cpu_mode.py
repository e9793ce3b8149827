"""CPU mode: lets megatron-core run on a machine without a GPU.

megatron-core assumes CUDA in a handful of places even when every tensor lives on the CPU. In CPU
mode (and only there: never call this on a GPU machine) these are redirected:

* ``torch.cuda.current_device()`` returns the CPU device (megatron passes it as a device argument,
  e.g. for the rotary embedding's ``inv_freq`` and inside autograd backward functions, where the
  function mode below is not active).
  ``torch.cuda.synchronize()`` (called by the checkpoint writer) does nothing.
* The CUDA RNG state functions of ``megatron.core.tensor_parallel.random`` and
  ``CudaRNGStatesTracker.add`` use the CPU generator instead, so the RNG tracker (dropout inside
  tensor-parallel regions, activation recomputation) keeps its semantics: forking a named state
  swaps the CPU generator's state in and out. The tracker's warning that the CPU state changed
  inside a fork is therefore expected and silenced.
* A ``TorchFunctionMode`` rewrites device arguments that name CUDA (``device='cuda'``, ``'cuda:1'``,
  ``torch.device('cuda')``) in factory calls and ``Tensor.to``, and makes ``Tensor.cuda()`` a no-op.
  Autograd runs backward functions without Python function modes, so megatron code that names
  ``'cuda'`` inside a backward pass would not be caught; megatron-core 0.16.1's backward functions
  only use ``current_device()``.
* ``Tensor.type()`` without arguments reports ``torch.cuda.*Tensor`` for CPU tensors, because the
  optimizer and ``clip_grad_by_total_norm_fp32`` assert that gradients are CUDA float tensors.
* Mixture-of-experts layers: the router's gating matmul calls Transformer Engine's ``te_general_gemm`` whenever
  that name is bound, and ``moe_utils`` binds it only when TE imports (a ``NameError`` without TE); it is bound
  to None, which selects the ``torch.mm`` path already there. The alltoall token dispatcher creates a CUDA stream
  and copies the split sizes to the host on it; here the stream is a placeholder and the copy a stream-free one
  that turns the split sizes into numpy arrays, as the GPU path leaves them.

``enable_cpu_mode()`` is idempotent. It must be called before megatron-core builds anything.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_enabled = False
_CPU = torch.device("cpu")


def enable_cpu_mode() -> None:
    """Redirects megatron-core's CUDA-only calls to the CPU; see the module docstring."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU mode is for machines without a GPU; to run on the CPU here, hide the GPUs "
            "with CUDA_VISIBLE_DEVICES="
        )
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    _redirect_rng()
    _redirect_moe()
    _CudaOnCpu().__enter__()  # stays active for the life of the process
    _enabled = True


def _redirect_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
    mcore_random._get_cuda_rng_state = get_rng_state
    mcore_random._set_cuda_rng_state = set_rng_state
    mcore_random.CudaRNGStatesTracker.add = add


def _redirect_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher

    def splits_to_host(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    dispatcher.cuda_dtoh_stream = object()  # __init__ creates a CUDA stream only while this is None
    dispatcher._maybe_dtoh_and_synchronize = splits_to_host


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaOnCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype) or func(*args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)
