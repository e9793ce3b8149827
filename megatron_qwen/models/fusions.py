"""The compile-based kernel fusions of a run: whether they are on, and why (``--kernel-fusions``).

megatron-core's fused SwiGLU and bias-dropout-add (``torch.compile``'d; no Transformer Engine or apex needed) and
fused RoPE (Transformer Engine's kernels, else the compiled ones of ``models/rope.py``) are on by default in
Megatron-LM. Each replaces a few memory-bound kernels per layer with one each way. On the CPU the compilation
(~20 s per process) outweighs that, so they are off there unless asked for. On a GPU they are on, once a probe has
compiled and run a small function: Inductor needs a C compiler and Python's headers, which some hosts lack, and
without the probe such a host would fail at the first forward instead of training unfused.
"""
from __future__ import annotations

from typing import Callable

import torch

FUSED_KERNELS = {"bias_activation_fusion": True, "bias_dropout_fusion": True, "apply_rope_fusion": True}


def _probe_function(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) * y + 1.0  # the shape of a fused SwiGLU


def compile_probe(device: str | torch.device) -> str | None:
    """None when ``torch.compile`` builds and runs a small fused function on ``device`` with the right result;
    else what failed, in one line."""
    import torch._dynamo

    x = torch.linspace(-2.0, 2.0, 256, device=device)
    try:
        found = torch.compile(_probe_function, dynamic=False)(x, x.flip(0))
    except Exception as error:  # noqa: BLE001 - whatever stops Inductor here would stop the first forward
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
    finally:
        torch._dynamo.reset()  # the probe's graph (or its failure) is not kept for the model's functions
    if not torch.allclose(found, _probe_function(x, x.flip(0))):
        return "the compiled function's result differs from eager mode"
    return None


def choose_kernel_fusions(requested: bool | None, device_type: str, probe: Callable[[], str | None]) -> tuple[bool, str]:
    """(on, why) for ``--kernel-fusions`` (True), ``--no-kernel-fusions`` (False) or neither (None) on a device of
    ``device_type``; ``probe`` is ``compile_probe`` for the run's device, called only where the answer depends on it.
    Asked for and not working is an error: the run would otherwise fail at its first forward."""
    if requested is False:
        return False, "off (--no-kernel-fusions)"
    if requested is None and device_type == "cpu":
        return False, "off (CPU; --kernel-fusions compiles them)"
    failure = probe()
    if failure is not None:
        if requested:
            raise ValueError(f"--kernel-fusions: torch.compile does not work here ({failure})")
        return False, f"off (probe failed: {failure})"
    return True, "on (--kernel-fusions)" if requested else "on (torch.compile probe passed)"
