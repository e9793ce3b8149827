"""Worker: a save that fails on the writing rank alone stops every rank with the same error, and leaves the
iteration saved before as the latest, with nothing half-written beside it.

Usage: torchrun --nproc-per-node 2 save_failure.py ROOT OUT_PREFIX. Iteration 1 is saved; iteration 2 asks for
an extra file beneath ``model_config.json``, which rank 0 writes first as a file, so rank 0's part of the save
fails after the collective write, as a full disk or a lost mount would make it fail, while rank 1 has nothing
left to do but wait. Each rank writes OUT_PREFIX.RANK.json: the error it got and the folder's entries after it.
"""
import json
import sys
from pathlib import Path


def state():
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    replica = torch.distributed.get_rank()  # the same tensor on both ranks: rank 0's copy is the one written
    return {"weight": ShardedTensor.from_rank_offsets("weight", torch.ones(4, 3), replica_id=replica)}


def main(root: Path, out_prefix: str) -> None:
    import torch

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.data.tokenizer import load_tokenizer
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform import distributed

    distributed.initialize()
    saved = dict(model_config=PRESETS["tiny"], tokenizer=load_tokenizer("qwen"))
    layout.save_iteration(root, 1, state(), **saved)
    try:
        layout.save_iteration(root, 2, state(), extra_files={"model_config.json/more.json": "{}"}, **saved)
        error = None
    except layout.CheckpointSaveError as failure:
        error = str(failure)
    torch.distributed.barrier()  # rank 0 has finished cleaning up
    result = {"error": error, "entries": sorted(path.name for path in root.iterdir()),
              "latest": layout.latest_iteration(root)}
    Path(f"{out_prefix}.{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    distributed.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
