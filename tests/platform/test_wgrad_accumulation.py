"""platform/wgrad_accumulation.py on its own (its use inside megatron's layers and DDP is checked against the
token-weighted reference gradients in tests/training/test_loss.py)."""
import torch

from megatron_qwen.platform import wgrad_accumulation
from megatron_qwen.platform.wgrad_accumulation import accumulates_correctly, wgrad_gemm_accum


def test_adds_the_weight_gradient_into_the_buffer_in_place():
    generator = torch.Generator().manual_seed(3)
    total_input, grad_output = torch.randn(10, 6, generator=generator), torch.randn(10, 4, generator=generator)
    main_grad = torch.randn(4, 6, generator=generator)
    before, storage = main_grad.clone(), main_grad.data_ptr()
    for _ in range(2):  # two micro-batches
        wgrad_gemm_accum(total_input, grad_output, main_grad)
    # weight gradient of y = x W^T: sum over tokens of grad_y[t]^T x[t], here in float64 and by the definition
    expected = before.double() + 2 * sum(
        torch.outer(grad_output[t].double(), total_input[t].double()) for t in range(10)
    )
    assert main_grad.data_ptr() == storage
    assert torch.allclose(main_grad.double(), expected, rtol=1e-6, atol=1e-6)


def test_the_probe_accepts_float32_and_answers_for_bf16_without_raising():
    assert accumulates_correctly(torch.device("cpu"), torch.float32)
    # bf16 operands into a float32 buffer need addmm's out_dtype, which torch implements for CUDA only (2.13):
    # the probe must say no here instead of failing the run
    assert accumulates_correctly(torch.device("cpu"), torch.bfloat16) in (True, False)


def test_the_probe_says_no_on_a_torch_without_out_dtype(monkeypatch):
    # torch before 2.8 has no out_dtype keyword on addmm: the call raises TypeError, which must turn the fusion
    # off rather than stop the run at start-up
    def addmm_without_out_dtype(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            raise TypeError("addmm() received an invalid combination of arguments - got (..., out_dtype=...)")
        return real_addmm(*args, **kwargs)

    real_addmm = torch.addmm
    monkeypatch.setattr(wgrad_accumulation.torch, "addmm", addmm_without_out_dtype)
    accumulates_correctly.cache_clear()
    try:
        assert not accumulates_correctly(torch.device("cpu"), torch.bfloat16)
        assert accumulates_correctly(torch.device("cpu"), torch.float32)  # addmm_ needs no out_dtype
    finally:
        accumulates_correctly.cache_clear()
