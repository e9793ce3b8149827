"""Worker: megatron's distributed optimizer on torch's AdamW fallback, default kernel against the fused one.

One process (gloo, CPU mode), the tiny preset in float32. Three optimizers over the same starting weights and
the same gradients: A keeps torch's default kernel, B is switched to the fused kernel by
``select_adam_kernel`` (torch has a fused AdamW on the CPU too, so the switch itself can run here), and C is
a fresh fused optimizer that loads B's checkpoint after two updates. Then gradient clipping (grad_clipping.py).
Prints one JSON line of findings.
"""
import json
import sys
import tempfile

import torch

from grad_clipping import clipping_findings


def fill_gradients(chunks, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for chunk in chunks:
        for param in chunk.module.parameters():
            param.main_grad.copy_(torch.randn(param.main_grad.shape, generator=generator) * 1e-2)


def weights(chunks) -> dict:
    return {name: param.detach().clone() for name, param in chunks[0].module.named_parameters()}


def main(checkpoint_dir: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform import distributed
    from megatron_qwen.training import optimizer as optimizer_state
    from megatron_qwen.config import RunConfig
    from megatron_qwen.models.chunks import build_chunks

    distributed.initialize(seed=1)
    config = RunConfig()
    config.model.precision, config.model.dropout, config.optimizer.lr = "fp32", 0.0, 1e-3
    start = None

    def build(fused: bool | None):
        nonlocal start
        chunks = build_chunks(PRESETS["tiny"], config.model, config.parallel)
        chunks = optimizer_state.wrap_ddp(chunks, distributed_optimizer=True)
        if start is None:
            start = {key: value.clone() for key, value in chunks[0].module.state_dict().items() if value is not None
                     and torch.is_tensor(value)}
        chunks[0].module.load_state_dict(start, strict=False)
        optimizer = optimizer_state.build_optimizer(chunks, config.optimizer, "fp32", distributed_optimizer=True)
        if fused is not None:
            optimizer_state.select_adam_kernel(optimizer, fused=fused)
        return chunks, optimizer

    def update(chunks, optimizer, seed: int) -> None:
        fill_gradients(chunks, seed)
        optimizer.step()

    default_chunks, default_opt = build(None)
    fused_chunks, fused_opt = build(True)
    findings = {"default_kernel": optimizer_state.adam_description(default_opt),
                "fused_kernel": optimizer_state.adam_description(fused_opt)}
    for seed in (1, 2):
        update(default_chunks, default_opt, seed)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            update(fused_chunks, fused_opt, seed)
    findings["fused_op_ran"] = any(event.key == "aten::_fused_adamw_" for event in profile.key_averages())
    a, b = weights(default_chunks), weights(fused_chunks)
    findings["max_weight_difference"] = max((a[name] - b[name]).abs().max().item() for name in a)
    findings["weights_moved"] = max((b[name] - start_weight).abs().max().item()
                                    for name, start_weight in start.items() if name in b)

    requested = {"model": fused_chunks[0].module.sharded_state_dict()}
    saved = dict(requested, optimizer=optimizer_state.sharded_state_dict(fused_opt, requested))
    dist_checkpointing.save(saved, checkpoint_dir)

    resumed_chunks, resumed_opt = build(True)
    model_request = {"model": resumed_chunks[0].module.sharded_state_dict()}
    optimizer_state_request = optimizer_state.sharded_state_dict(resumed_opt, model_request, is_loading=True)
    loaded = dist_checkpointing.load(dict(model_request, optimizer=optimizer_state_request), checkpoint_dir)
    resumed_chunks[0].module.load_state_dict(loaded["model"], strict=False)
    optimizer_state.load_state_dict(resumed_opt, loaded["optimizer"])
    adam = resumed_opt.optimizer
    steps = [state["step"] for state in adam.state.values()]
    findings["resumed_kernel"] = optimizer_state.adam_description(resumed_opt)
    findings["resumed_steps"] = sorted({float(step) for step in steps})
    findings["resumed_steps_distinct"] = len({id(step) for step in steps}) == len(steps)
    update(fused_chunks, fused_opt, 3)
    update(resumed_chunks, resumed_opt, 3)
    b, c = weights(fused_chunks), weights(resumed_chunks)
    findings["resumed_max_weight_difference"] = max((b[name] - c[name]).abs().max().item() for name in b)
    findings["clipping"] = clipping_findings()
    print("FINDINGS " + json.dumps(findings), flush=True)
    distributed.destroy()


if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    with tempfile.TemporaryDirectory() as directory:
        main(directory if len(sys.argv) < 2 else sys.argv[1])
