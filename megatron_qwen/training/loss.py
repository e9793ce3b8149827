"""The token-weighted SFT loss, plugged into megatron-core's pipeline schedules.

The loss of a global batch is ``sum(per-token loss * loss_mask) / sum(loss_mask)`` over every micro-batch,
data-parallel rank and pipeline stage of the step, so it does not depend on how the batch is split (a mean of
per-micro-batch means would weight a micro-batch with 3 supervised tokens like one with 3000).

How megatron-core 0.16.1 computes exactly that (``pipeline_parallel/schedules.py``,
``distributed/finalize_model_grads.py``), given ``calculate_per_token_loss=True`` in the model's
``TransformerConfig`` (the DDP config must keep ``average_in_collective=False``, which DDP asserts):

1. ``loss_func`` returns ``(loss_sum, num_tokens, logging)``; the schedule back-propagates ``loss_sum``
   unscaled and adds ``num_tokens`` into the step's ``total_num_tokens`` (non-zero only on the last stage).
2. DDP sums (does not average) gradients over data-parallel ranks.
3. ``finalize_model_grads`` broadcasts ``total_num_tokens`` from the last pipeline stage to the others,
   all-reduces it over data-parallel ranks and multiplies every gradient by ``1 / total``.

The gradient is therefore that of the global-batch mean. ``global_batch_totals`` reduces the logged
``(loss_sum, num_tokens)`` pairs the same way, for the number the log prints.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

LOG_KEY = "lm loss"


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the supervised positions' losses in float32, number of supervised positions as an int tensor)."""
    loss_mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    return loss_sum, loss_mask.sum().to(torch.int)


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron-core's 3-tuple loss function: (loss to back-propagate, supervised tokens, values to log)."""
    loss_sum, num_tokens = masked_loss_sum(per_token_loss, loss_mask)
    logged = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {LOG_KEY: logged}


def make_loss_func(loss_mask: torch.Tensor):
    """What a ``forward_step_func`` returns next to the model's per-token loss output."""
    return partial(loss_func, loss_mask)


def require_per_token_loss(model_config, ddp_config=None) -> None:
    """Refuses a configuration under which megatron would average per micro-batch instead."""
    if not model_config.calculate_per_token_loss:
        raise ValueError("TransformerConfig.calculate_per_token_loss must be True for the token-weighted SFT loss")
    if ddp_config is not None and ddp_config.average_in_collective:
        raise ValueError("DistributedDataParallelConfig.average_in_collective must be False with a per-token loss")


def global_batch_totals(forward_data_store: list[dict], group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """``[sum of the supervised positions' losses, number of supervised positions]`` of the step, from the
    logging dicts ``forward_backward_func`` returned on this rank, all-reduced over ``group`` (the data-parallel
    group). ``None`` off the last pipeline stage, which computes no loss."""
    if not forward_data_store:
        return None
    totals = torch.stack([entry[LOG_KEY] for entry in forward_data_store]).sum(dim=0)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return totals
