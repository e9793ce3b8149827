"""One training update and one validation pass, through megatron-core's pipeline schedules.

Every rank collates its data-parallel share of the global batch, and every pipeline stage (first, middle and
last, every model chunk of an interleaved schedule) runs its forward with the micro-batch's own
``packed_seq_params``: a middle stage without them would attend across the conversations of a packed row.
A packed micro-batch of several rows is one THD sequence whose ``cu_seqlens`` hold every row's boundaries
(``training/rows.py``).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.training import faults
from megatron_qwen.training.loss import global_batch_loss, make_loss_func
from megatron_qwen.training.rows import MicroBatch


def device() -> torch.device:
    """Where this rank's tensors live (in CPU mode ``current_device()`` is the CPU)."""
    return torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _on_device(batch: MicroBatch) -> MicroBatch:
    moved = {
        name: getattr(batch, name).to(device(), non_blocking=True)
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")
        if getattr(batch, name) is not None
    }
    return dataclasses.replace(batch, **moved)


def forward_step(iteration: int, data_iterator, model):
    """megatron's ``forward_step_func``: per-token losses on the last stage, hidden states elsewhere."""
    batch = _on_device(next(data_iterator))
    output = model(
        batch.tokens,
        batch.position_ids,
        None,
        labels=batch.labels,
        packed_seq_params=batch.packed_seq_params(),
    )
    if model.module.post_process:
        output = faults.poison_loss(output, iteration)
    return output, make_loss_func(batch.loss_mask)


@dataclasses.dataclass(frozen=True)
class ScheduleShape:
    """What the pipeline schedule is told about one micro-batch (``rows.schedule_shape``)."""

    seq_length: int
    micro_batch_size: int


def run_schedule(chunks: list, micro_batches: list[MicroBatch], shape: ScheduleShape, iteration: int, forward_only: bool):
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, iteration),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        forward_only=forward_only,
    )


def _loss_everywhere(forward_data_store: list) -> float:
    """The global batch's token-weighted loss, computed on the last stage and sent to every stage."""
    loss = global_batch_loss(forward_data_store, parallel_state.get_data_parallel_group())
    # kept a tensor until the end: one host sync per call, not one before the broadcast and one after
    value = torch.full((1,), float("nan"), device=device()) if loss is None else loss.reshape(1).float()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            value,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return value.item()


def _batch_counts(micro_batches: list[MicroBatch]) -> dict[str, int]:
    """Non-padding tokens, supervised tokens and conversations of the whole global batch."""
    counts = torch.tensor(
        [
            sum(batch.num_tokens for batch in micro_batches),
            sum(batch.num_supervised for batch in micro_batches),
            sum(batch.num_conversations for batch in micro_batches),
        ],
        dtype=torch.float64,
        device=device(),
    )
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    tokens, supervised, conversations = (int(count) for count in counts.tolist())
    return {"tokens": tokens, "supervised_tokens": supervised, "conversations": conversations}


@dataclasses.dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int
    supervised_tokens: int
    conversations: int


def train_step(chunks, optimizer, scheduler, micro_batches, shape: ScheduleShape, iteration: int) -> StepResult:
    """Update ``iteration`` (1-based): forward and backward over the micro-batches, then one optimizer step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    store = run_schedule(chunks, micro_batches, shape, iteration, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return StepResult(
        loss=_loss_everywhere(store),
        grad_norm=float("nan") if grad_norm is None else float(grad_norm),
        lr=lr,
        skipped=not updated,
        **_batch_counts(micro_batches),
    )


def validation_loss(chunks, batches: list[list[MicroBatch]], shape: ScheduleShape) -> float:
    """Token-weighted loss over every validation batch (dropout off)."""
    for chunk in chunks:
        chunk.eval()
    store = []
    with torch.no_grad():
        for micro_batches in batches:
            store += run_schedule(chunks, micro_batches, shape, iteration=0, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _loss_everywhere(store)
