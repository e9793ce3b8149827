"""Distributed start-up: torch.distributed, megatron-core's parallel groups and the seeds.

The process's rank and world come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), from SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, with
``MASTER_ADDR`` taken from the first host of ``SLURM_NODELIST`` when unset), or, with neither, a
single process (rank 0 of 1 on a free local port) so that tools run without a launcher. CPU runs use
gloo and CPU mode; GPU runs use NCCL, one GPU per local rank.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import re
import socket

import torch

from megatron_qwen.platform.cpu_mode import enable_cpu_mode

_DEFAULT_PORT = "29500"


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    seed: int = 1234,
    cpu: bool | None = None,
    timeout_minutes: float = 30.0,
) -> None:
    """Starts torch.distributed and megatron-core's model-parallel groups, then seeds every RNG.

    ``expert_parallel`` and ``expert_tensor_parallel`` (default: ``tensor_parallel``) lay out the experts of a
    mixture of experts: megatron-core regroups the same ranks as expert-TP x EP x expert-DP x PP, so the world
    size must be a multiple of both ``tensor_parallel x pipeline_parallel`` and ``expert_tensor_parallel x
    expert_parallel x pipeline_parallel`` (``world_size_for``).

    ``cpu=None`` means: CPU when no GPU is visible. ``timeout_minutes`` is how long any collective, in the
    world group and in megatron's groups alike, waits for the last rank before it fails. torch's own default
    for the NCCL world group is 10 minutes, megatron's for its groups 30; checkpoint saves and loads run in
    the world group, and a large model's save on a slow shared file system can keep the other ranks
    waiting at a barrier for longer than 10 minutes.
    """
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        enable_cpu_mode()
    rank, world_size, local_rank = _launch_environment()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        if not cpu:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(
            backend="gloo" if cpu else "nccl", rank=rank, world_size=world_size, timeout=timeout
        )
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel={tensor_parallel} "
            f"x pipeline_parallel={pipeline_parallel}"
        )
    expert_tensor_parallel = expert_tensor_parallel or tensor_parallel
    if world_size % (expert_tensor_parallel * expert_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world_size} is not divisible by expert_tensor_parallel={expert_tensor_parallel} "
            f"x expert_parallel={expert_parallel} x pipeline_parallel={pipeline_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    # With use_cpu_initialization the weights come from the CPU generator, which
    # model_parallel_cuda_manual_seed does not touch; seed both so that runs repeat.
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)


def world_size_for(
    tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
) -> int:
    """The fewest processes that hold a layout: a multiple of TP x PP (data parallelism fills the rest) and of
    expert-TP x EP x PP (expert data parallelism fills the rest); e.g. TP2 with EP2 and expert-TP 2 needs 4."""
    experts = (expert_tensor_parallel or tensor_parallel) * expert_parallel
    return pipeline_parallel * math.lcm(tensor_parallel, experts)


def destroy() -> None:
    """Tears down megatron-core's groups and the process group (safe to call twice), and takes back the rendezvous
    address ``initialize`` filled in: a process that goes on (tests, tools) would otherwise hand it to the processes
    it starts, which would then try to bind a port this one may still hold."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    while _filled:
        os.environ.pop(_filled.pop(), None)


def on_any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, set when it is set on any rank (one all-reduce; collective). A single process has only its own."""
    if not torch.distributed.is_initialized():
        return flags
    nccl = torch.distributed.get_backend() == "nccl"
    values = torch.tensor([float(flag) for flag in flags], device=torch.cuda.current_device() if nccl else "cpu")
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


def all_gathered(value) -> list:
    """Every rank's ``value`` (picklable), in rank order (collective); a single process has only its own."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def rank_and_size() -> tuple[int, int]:
    """This process's global rank and the world size (0 and 1 without torch.distributed)."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _launch_environment() -> tuple[int, int, int]:
    """Returns (rank, world size, local rank) and fills MASTER_ADDR/MASTER_PORT where needed."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        _fill("MASTER_ADDR", lambda: first_slurm_host(env["SLURM_NODELIST"]))
        _fill("MASTER_PORT", lambda: _DEFAULT_PORT)
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    _fill("MASTER_ADDR", lambda: "127.0.0.1")
    _fill("MASTER_PORT", lambda: str(free_port()))
    return 0, 1, 0


_filled: list[str] = []  # the variables _launch_environment set, for destroy() to take back


def _fill(name: str, value) -> None:
    """Sets ``os.environ[name]`` to ``value()`` unless the launcher set it."""
    if name not in os.environ:
        os.environ[name] = value()
        _filled.append(name)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise ValueError(f"SLURM_NODELIST {nodelist!r} names no host")
    prefix, ranges = first.group(1), first.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port that was free on this host a moment ago, chosen below Linux's ephemeral range (32768 and up by
    default), from which the kernel takes the source ports of outgoing connections: gloo opens many, and one of
    them could take a port found free there before the rendezvous binds it."""
    draw = random.Random()  # its own generator: the run's seeded global one must not advance
    for _ in range(100):
        port = draw.randrange(20000, 32768)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free TCP port found between 20000 and 32767")
