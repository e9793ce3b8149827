"""Every random-number state a training step reads, captured and restored per rank for bit-exact resumes.

Dropout draws from torch's default generator (hidden dropout outside tensor-parallel regions) and from
megatron's RNG tracker (attention dropout inside them; in CPU mode the tracker swaps CPU generator states),
so pipeline stages and tensor-parallel ranks hold different states after the first step: each rank saves its
own, as a ``ShardedObject`` indexed by its (pipeline, tensor, data)-parallel coordinates.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject

KEY = "rng_state"


def capture() -> dict:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


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
