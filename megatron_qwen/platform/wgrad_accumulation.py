"""Weight-gradient GEMMs that add straight into the float32 ``main_grad`` buffer, without apex.

megatron-core's ``gradient_accumulation_fusion`` has each linear layer's backward call apex's
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)``: one GEMM whose
epilogue adds ``grad_output^T @ input`` into the float32 gradient buffer. Without the extension megatron
refuses the flag, and every micro-batch writes a bf16 weight gradient that DDP's hook then reads back and adds
into ``main_grad`` (about 4 bytes per parameter of extra traffic per micro-batch, plus the bf16 tensors).

torch's ``addmm`` does the same GEMM-with-accumulate: with bf16 inputs it takes ``out_dtype=torch.float32``
(CUDA only), accumulating into the float32 buffer in place (cuBLAS with beta = 1), and with inputs of the
buffer's own dtype it is plain ``addmm_``. ``provide_wgrad_accumulation`` puts these behind megatron's hook
for the extension when apex is missing, after checking numerically on the device that this torch build
accepts the pairing (torch releases differ in whether the CUDA kernel takes a float32 accumulator for bf16
inputs); it returns whether the fusion can be used.
"""
from __future__ import annotations

import functools
import types

import torch


def wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` for 2-D ``[tokens, in]`` / ``[tokens, out]`` operands."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)


@functools.cache
def accumulates_correctly(device: torch.device, input_dtype: torch.dtype) -> bool:
    """Whether ``wgrad_gemm_accum`` works here for ``input_dtype`` operands and a float32 buffer."""
    generator = torch.Generator().manual_seed(0)
    total_input, grad_output = (torch.randn(64, n, generator=generator) for n in (48, 32))
    main_grad = torch.randn(32, 48, generator=generator)
    inputs = [tensor.to(device, input_dtype) for tensor in (total_input, grad_output)]
    expected = main_grad.double() + inputs[1].double().t() @ inputs[0].double()
    found = main_grad.to(device)
    try:
        wgrad_gemm_accum(*inputs, found)
    except (RuntimeError, NotImplementedError, TypeError):  # TypeError: a torch without addmm's out_dtype
        return False
    return torch.allclose(found.double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-4)


def provide_wgrad_accumulation(device: torch.device, input_dtype: torch.dtype) -> bool:
    """Makes megatron's ``gradient_accumulation_fusion`` usable: apex's extension where it is installed, else
    ``wgrad_gemm_accum`` where it works on ``device`` (idempotent). False when neither is available."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not accumulates_correctly(device, input_dtype):
        return False
    # megatron picks the float32 or the 16-bit entry by the buffer's dtype; addmm covers both
    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_gemm_accum, wgrad_gemm_accum_fp16=wgrad_gemm_accum
    )
    layers._grad_accum_fusion_available = True
    return True
