"""A converted mixture of experts saved at one expert layout and loaded at another, in one torchrun launch.

Usage (2 processes): moe_reshard.py MCORE_DIR OUT_DIR. Loads MCORE_DIR (written by the converter, at EP1) at EP2
(each rank holds half the experts; expert data parallelism 2), saves it as OUT_DIR/ep2, then loads that at EP1
again and writes OUT_DIR/result.json (rank 0): the local expert counts each layout built, and whether every
tensor of the EP1 model loaded from OUT_DIR/ep2 equals the one loaded from MCORE_DIR, on every rank.
"""
import json
import sys
from pathlib import Path


def load(model_dir):
    import torch

    from megatron_qwen.checkpoint import layout, verify

    iteration_dir = layout.resolve_iteration(model_dir)
    cfg, model = verify.load_megatron(iteration_dir, torch.float32)
    return iteration_dir, cfg, model


def local_experts(model) -> int:
    return sum(1 for name, _ in model.named_parameters() if name.startswith("decoder.layers.0.mlp.experts.")
               and name.endswith("linear_fc1.weight"))


def main() -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.platform import distributed

    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    distributed.initialize(expert_parallel=2)
    iteration_dir, cfg, model = load(source)
    experts_at_ep2 = local_experts(model)
    layout.save_iteration(out / "ep2", 0, model.sharded_state_dict(), model_config=cfg,
                          tokenizer=layout.stored_tokenizer(iteration_dir))
    parallel_state.destroy_model_parallel()

    distributed.initialize(expert_parallel=1)
    _, _, original = load(source)
    _, _, resharded = load(out / "ep2")
    expected = original.state_dict()
    equal = all(torch.equal(value, expected[name]) for name, value in resharded.state_dict().items()
                if isinstance(value, torch.Tensor))
    (differs_somewhere,) = distributed.on_any_rank(not equal)
    if torch.distributed.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({
            "experts_at_ep2": experts_at_ep2, "experts_at_ep1": local_experts(resharded),
            "equal": not differs_somewhere, "tensors": len(expected),
        }))
    distributed.destroy()


if __name__ == "__main__":
    main()
