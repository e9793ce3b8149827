"""The token-weighted loss: its arithmetic, and megatron-core's schedule + DDP computing it across splits."""
import json
import types

import pytest
import torch
from workers import run_torchrun

from megatron_qwen.training.loss import LOG_KEY, global_batch_totals, loss_func, masked_loss_sum, require_per_token_loss


def test_loss_func_returns_sum_count_and_logged_pair():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    loss_sum, num_tokens, logged = loss_func(mask, per_token)
    assert loss_sum.item() == 6.0 and num_tokens.dtype == torch.int32 and num_tokens.item() == 2
    assert logged[LOG_KEY].tolist() == [6.0, 2.0]
    loss_sum.backward()
    assert per_token.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]  # unscaled: megatron divides by the global count


def test_global_batch_totals_weight_every_supervised_token_equally():
    # Micro-batches with 1, 3 and 0 supervised tokens: losses 9 | 1, 2, 3 | (none).
    micro_batches = [
        (torch.tensor([9.0, 5.0]), torch.tensor([1.0, 0.0])),
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])),
        (torch.tensor([7.0]), torch.tensor([0.0])),
    ]
    store = [loss_func(mask, losses)[2] for losses, mask in micro_batches]
    loss_sum, supervised = global_batch_totals(store).tolist()
    assert supervised == 4 and loss_sum / supervised == pytest.approx((9 + 1 + 2 + 3) / 4)  # not mean of means 5.5
    assert global_batch_totals([]) is None  # not the last pipeline stage
    assert masked_loss_sum(torch.ones(2, 3), torch.zeros(2, 3))[1].item() == 0


def test_configurations_that_would_average_per_micro_batch_are_refused():
    with pytest.raises(ValueError, match="calculate_per_token_loss must be True"):
        require_per_token_loss(types.SimpleNamespace(calculate_per_token_loss=False))
    with pytest.raises(ValueError, match="average_in_collective must be False"):
        require_per_token_loss(
            types.SimpleNamespace(calculate_per_token_loss=True), types.SimpleNamespace(average_in_collective=True)
        )


@pytest.mark.slow
def test_megatron_schedule_gives_the_global_token_mean_for_every_split(tmp_path):
    out = tmp_path / "loss.json"
    run_torchrun("training_loss.py", 2, out, timeout=240)
    result = json.loads(out.read_text())
    reference = result["reference_loss"]
    assert abs(result["mean_of_means"] - reference) > 1e-3  # the batch tells the two definitions apart
    for split in ("mbs1", "mbs2", "mbs1_fused_wgrad"):
        assert result[split]["loss"] == pytest.approx(reference, rel=1e-6)
        assert result[split]["max_grad_difference"] <= 1e-5 * result[split]["max_grad"]
    # the fused split accumulated through platform/wgrad_accumulation.py: the QKV, output-projection, fc1 and
    # fc2 weights of both layers, once per micro-batch (2 per rank)
    assert result["fused_wgrad_calls"] == 4 * 2 * 2
