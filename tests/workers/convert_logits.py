"""Logits of converted checkpoints at TP1/PP1, TP2/PP1, TP1/PP2 and TP2/PP2, in one torchrun launch.

Usage (4 processes): convert_logits.py CASES.json OUT_DIR, where CASES.json maps a case name to
``{"mcore_dir": ..., "prompts": [[ids...], ...]}``. For every layout the 4 ranks are regrouped (the
rest is data parallelism) and the rank holding the last stage's logits saves
``OUT_DIR/{case}-tp{T}-pp{P}.pt``: a list of float32 ``[len(prompt), vocab]`` tensors.
"""
import json
import sys
from pathlib import Path

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))


def main() -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint import layout, verify
    from megatron_qwen.platform import distributed

    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    for tp, pp in LAYOUTS:
        distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
        for name, case in cases.items():
            cfg, model = verify.load_megatron(layout.resolve_iteration(case["mcore_dir"]), torch.float32)
            logits = [verify.megatron_logits(model, cfg, ids) for ids in case["prompts"]]
            if verify.holds_output():
                torch.save(logits, out_dir / f"{name}-tp{tp}-pp{pp}.pt")
        parallel_state.destroy_model_parallel()
    distributed.destroy()


if __name__ == "__main__":
    main()
