"""Every random-number state a training step reads, captured and restored per rank for bit-exact resumes.

Dropout draws from torch's default generator (hidden dropout outside tensor-parallel regions) and from
megatron's RNG tracker (attention dropout inside them; in CPU mode the tracker swaps CPU generator states),
so pipeline stages and tensor-parallel ranks hold different states after the first step: each rank saves its
own, as a ``ShardedObject`` indexed by its (pipeline, tensor, data)-parallel coordinates.

The tracker's states are CUDA generator states on a GPU (16 bytes) and CPU generator states in CPU mode (5,056
bytes), and megatron's ``set_states`` does not check which it is given: a resume on the other kind of device
(a GPU checkpoint debugged on the CPU) would fail at the first dropout. States are saved with their device kind
(checkpoints from before carry none; their tracker states' size tells), and a resume on another kind continues
from the run's seed, as a resume at another layout does.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject

KEY = "rng_state"
# bytes of a generator state, by the device kind that has it
_STATE_SIZES = {16: "cuda", 5056: "cpu"}


def device_kind() -> str:
    """The kind of generator megatron's tracker holds here (CPU mode wherever no GPU is visible)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def capture() -> dict:
    states = {
        "device": device_kind(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def saved_kind(states: dict) -> str:
    """The device kind of saved states: recorded, or (checkpoints from before) told by the tracker states' size."""
    if "device" in states:
        return states["device"]
    sizes = {state.numel() for state in states["tracker"].values()}
    kinds = {_STATE_SIZES.get(size, f"unknown ({size} bytes)") for size in sizes}
    return kinds.pop() if len(kinds) == 1 else "unknown"


def restore(states: dict, here: str | None = None) -> str | None:
    """Restores ``states`` when they were saved on this kind of device (``here``, default: this machine's); else
    leaves every generator as it is and returns why."""
    saved, here = saved_kind(states), here or device_kind()
    if saved != here:
        return f"saved on {saved}, running on {here}"
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    return None


def _coordinates() -> tuple[tuple[int, ...], tuple[int, ...]]:
    sizes = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    ranks = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return sizes, ranks


def sharded_object(states: dict | None = None) -> ShardedObject:
    """This rank's RNG states as a checkpoint entry (``None``: a placeholder to load into)."""
    sizes, ranks = _coordinates()
    return ShardedObject(KEY, states, sizes, ranks, replica_id=0)
