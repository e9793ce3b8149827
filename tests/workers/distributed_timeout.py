"""Worker: ``distributed.initialize(timeout_minutes=...)`` bounds how long a collective waits for a late rank.

Two processes (gloo, CPU mode), tensor parallel 2, so megatron's tensor-parallel group spans both ranks. Rank 1
joins each collective LATE seconds after rank 0: first an all-reduce in megatron's tensor-parallel group, then
a barrier of the world group (where checkpoint saves wait). Rank 0 prints one JSON line: for each collective,
whether it failed and after how many seconds. Both exit at once afterwards (the groups are broken by then).
"""
import json
import os
import sys
import time

import torch

LATE = 8.0  # seconds; well above the test's timeout, well below any default one


def timed(collective) -> dict:
    started = time.monotonic()
    try:
        collective()
        failed = False
    except RuntimeError:
        failed = True
    return {"failed": failed, "seconds": time.monotonic() - started}


def main(timeout_minutes: float) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.platform import distributed

    distributed.initialize(tensor_parallel=2, timeout_minutes=timeout_minutes)
    rank = torch.distributed.get_rank()
    tensor_group = parallel_state.get_tensor_model_parallel_group()
    collectives = {
        "tensor_parallel_all_reduce": lambda: torch.distributed.all_reduce(torch.ones(1), group=tensor_group),
        "world_barrier": torch.distributed.barrier,
    }
    findings = {}
    for name, collective in collectives.items():
        if rank == 1:
            time.sleep(LATE)
        findings[name] = timed(collective)
    if rank == 0:
        print("FINDINGS " + json.dumps(findings), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(float(sys.argv[1]))
