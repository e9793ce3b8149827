"""models/rope.py, the compiled RoPE of the local spec, against rotary embedding written from its definition:
channel i of the first half and channel i of the second half are a complex number, turned by the angle
position x base^(-2i/r) (float64). The angles handed to the functions are laid out as megatron-core's
``RotaryEmbedding`` lays them out; tests/workers/model_checks.py ``fused_kernels`` runs them inside the model
against megatron's unfused RoPE."""
import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_qwen.models.rope import fused_rope_bshd, fused_rope_thd

HEAD_DIM = 16
BASE = 10000.0


def angles(rotary_percent: float, length: int) -> torch.Tensor:
    """The angles [length, 1, 1, rotary channels] GPTModel passes to each layer: position x inverse frequency
    (megatron's ``inv_freq``), the half repeated (``RotaryEmbedding.forward`` needs a GPU to build them)."""
    embedding = RotaryEmbedding(HEAD_DIM, rotary_percent, rotary_base=BASE, use_cpu_initialization=True)
    half = torch.outer(torch.arange(length, dtype=torch.float32), embedding.inv_freq)
    return torch.cat((half, half), dim=-1)[:, None, None, :]


def rotated(t: torch.Tensor, positions: torch.Tensor, rotary_channels: int) -> torch.Tensor:
    """``t`` [tokens, ..., HEAD_DIM] turned by the definition, in float64; channels past ``rotary_channels`` kept."""
    half = rotary_channels // 2
    inverse_frequency = BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_channels)
    theta = positions.double()[:, None] * inverse_frequency  # [tokens, half]
    theta = theta.view(theta.shape[0], *([1] * (t.dim() - 2)), half)
    x = t.double()
    pairs = torch.complex(x[..., :half], x[..., half:rotary_channels]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((pairs.real, pairs.imag, x[..., rotary_channels:]), dim=-1)


def assert_values_and_gradients_match(ours, expected, t):
    """Float32 values, and the gradient with respect to ``t`` (the backward turns the incoming gradient back by
    the same angles), within float32 rounding of the float64 definition."""
    assert (ours.double() - expected).abs().max().item() < 1e-5
    grad = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, t, grad)
    (expected_grad,) = torch.autograd.grad(expected, t, grad.double())
    assert (ours_grad.double() - expected_grad).abs().max().item() < 1e-5


@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_padded_rows_float32_values_and_gradients(rotary_percent):
    torch.manual_seed(0)
    t = torch.randn(12, 2, 3, HEAD_DIM, requires_grad=True)
    ours = fused_rope_bshd(t, angles(rotary_percent, 12))
    assert_values_and_gradients_match(ours, rotated(t, torch.arange(12), int(HEAD_DIM * rotary_percent)), t)


def test_padded_rows_bfloat16_rounded_once():
    """In bf16 the rotation runs in float32 and is rounded once: within half a bf16 step of the exact result
    (up to float32 error), and never further from it than megatron's unfused path, which rounds on the way."""
    torch.manual_seed(1)
    t = torch.randn(64, 2, 4, HEAD_DIM).bfloat16()
    freqs = angles(1.0, 64)
    expected = rotated(t, torch.arange(64), HEAD_DIM)
    ours_error = (fused_rope_bshd(t, freqs).double() - expected).abs()
    unfused_error = (rope_utils._apply_rotary_pos_emb_bshd(t, freqs).double() - expected).abs()
    half_step = expected.abs() * 2.0**-8 + 1e-5  # bf16 keeps 8 significant bits
    assert (ours_error <= half_step).all()
    assert ours_error.max() <= unfused_error.max()
    assert ours_error.mean() < unfused_error.mean()


def test_packed_row_restarts_positions_per_segment():
    torch.manual_seed(2)
    lengths = [5, 7, 4]
    t = torch.randn(sum(lengths), 3, HEAD_DIM, requires_grad=True)
    cu_seqlens = torch.tensor([0, 5, 12, 16], dtype=torch.int32)  # on the host, as the local spec keeps it
    ours = fused_rope_thd(t, cu_seqlens, angles(1.0, max(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])
    assert_values_and_gradients_match(ours, rotated(t, positions, HEAD_DIM), t)


def test_unsupported_layouts_are_refused():
    t = torch.randn(4, 1, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="interleaved"):
        fused_rope_bshd(t, angles(1.0, 4), interleaved=True)
    with pytest.raises(ValueError, match="context parallelism"):
        fused_rope_thd(t[:, 0], torch.tensor([0, 4], dtype=torch.int32), angles(1.0, 4), cp_size=2)
