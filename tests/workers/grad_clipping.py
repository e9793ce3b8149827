"""Findings for tests/workers/optimizer_kernel.py (which runs them in its process): megatron's optimizer with
gradient clipping, on megatron's local multi-tensor fallbacks and on ours.

The tiny preset in bf16 without the distributed optimizer (so the float32 main
weights are copied into the bf16 weights through the same multi-tensor path) and in float32 with it. Each
layout builds two optimizers over the same weights: the reference runs megatron's own
``local_multi_tensor_l2_norm``/``local_multi_tensor_scale`` (put back in place of ours), the other runs with
those two functions made to raise, so any call to them during its steps fails the run. Both take the same
two updates with clipping engaged (gradients far above ``--clip-grad``).
"""
import torch


def fill_gradients(chunks, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for chunk in chunks:
        for param in chunk.module.parameters():
            param.main_grad.copy_(torch.randn(param.main_grad.shape, generator=generator))


def weights(chunks) -> torch.Tensor:
    return torch.cat([param.detach().float().flatten() for param in chunks[0].module.parameters()])


def forbidden(*args, **kwargs):
    raise AssertionError("megatron's local multi-tensor fallback ran")


def clipping_findings() -> dict:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer as megatron_optimizer

    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.training import optimizer as optimizer_state
    from megatron_qwen.config import RunConfig
    from megatron_qwen.models.chunks import build_chunks

    fallbacks = (utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale)
    fallback_code = [function.__code__ for function in fallbacks]
    findings = {}
    for precision, distributed_optimizer in (("bf16", False), ("fp32", True)):
        config = RunConfig()
        config.model.precision, config.model.dropout = precision, 0.0
        config.optimizer.lr, config.optimizer.clip_grad = 1e-3, 0.5
        torch.manual_seed(3)
        start = initial = None
        runs = {}
        for kernels in ("megatron", "ours"):
            chunks = build_chunks(PRESETS["tiny"], config.model, config.parallel)
            chunks = optimizer_state.wrap_ddp(chunks, distributed_optimizer)
            start = start or {k: v.clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}
            chunks[0].module.load_state_dict(start, strict=False)
            initial = weights(chunks) if initial is None else initial
            optimizer = optimizer_state.build_optimizer(chunks, config.optimizer, precision, distributed_optimizer)
            if kernels == "megatron":
                clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = fallbacks
                megatron_optimizer.multi_tensor_scale_impl = fallbacks[1]
            else:
                for function in fallbacks:
                    function.__code__ = forbidden.__code__
            norms = []
            for seed in (1, 2):
                fill_gradients(chunks, seed)
                norms.append(float(optimizer.step()[1]))
            for function, code in zip(fallbacks, fallback_code):
                function.__code__ = code
            runs[kernels] = (norms, weights(chunks))
        (megatron_norms, megatron_weights), (our_norms, our_weights) = runs["megatron"], runs["ours"]
        findings[precision] = {
            "megatron_norms": megatron_norms,
            "our_norms": our_norms,
            "max_weight_difference": (megatron_weights - our_weights).abs().max().item(),
            "weights_moved": (our_weights - initial).abs().max().item(),
        }
    return findings
