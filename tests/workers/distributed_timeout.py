"""Worker: ``distributed.initialize(timeout_minutes=...)`` bounds how long a collective waits for a late rank.

Two processes (gloo, CPU mode), tensor parallel 2, so megatron's tensor-parallel group spans both ranks. After
start-up, rank 1 stays away for LATE seconds and exits without joining anything, while rank 0 waits in an
all-reduce of megatron's tensor-parallel group, then in a barrier of the world group (where checkpoint saves
wait). Rank 0 prints one JSON line: for each collective, whether it failed and after how many seconds.

The timeout also bounds start-up itself, so the ranks first meet through files in the directory that the
second argument names: on a loaded machine one rank can finish importing megatron seconds after the other,
which must not count as lateness.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

LATE = 12.0  # seconds; well above twice the test's timeout, well below any default one


def meet(handshake_dir: Path, rank: int, world_size: int) -> None:
    (handshake_dir / f"ready-{rank}").touch()
    deadline = time.monotonic() + 120
    while len(list(handshake_dir.glob("ready-*"))) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks never reached {handshake_dir}")
        time.sleep(0.01)


def timed(collective) -> dict:
    started = time.monotonic()
    try:
        collective()
        failed = False
    except RuntimeError:
        failed = True
    return {"failed": failed, "seconds": time.monotonic() - started}


def main(timeout_minutes: float, handshake_dir: Path) -> None:
    from megatron.core import parallel_state

    from megatron_qwen.platform import distributed

    meet(handshake_dir, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    distributed.initialize(tensor_parallel=2, timeout_minutes=timeout_minutes)
    if torch.distributed.get_rank() == 1:
        time.sleep(LATE)
        os._exit(0)
    tensor_group = parallel_state.get_tensor_model_parallel_group()
    findings = {
        "tensor_parallel_all_reduce": timed(
            lambda: torch.distributed.all_reduce(torch.ones(1), group=tensor_group)
        ),
        "world_barrier": timed(torch.distributed.barrier),
    }
    print("FINDINGS " + json.dumps(findings), flush=True)
    os._exit(0)  # the groups are broken by now; tearing them down would wait again


if __name__ == "__main__":
    main(float(sys.argv[1]), Path(sys.argv[2]))
