"""One training update and one validation pass, through megatron-core's pipeline schedules.

Every rank collates its data-parallel share of the global batch, and every pipeline stage (first, middle and
last, every model chunk of an interleaved schedule) runs its forward with the micro-batch's own
``packed_seq_params``: a middle stage without them would attend across the conversations of a packed row.
A packed micro-batch of several rows is one THD sequence whose ``cu_seqlens`` hold every row's boundaries
(``batching/rows.py``).

Host synchronisations: an update waits for the GPU once for the gradient norm (megatron's clipping), once for
the loss and its supervised-token count (one tensor) and once for the preemption flag (``interrupts.py``); the
other counts of the log are known on the host from the rows (``BatchSource.counts``). A mixture of experts' routers
get each micro-batch's supervised and non-padding counts from the host too (``models/router.py``); their load is
read once per log interval (``Trainer.router_statistics``).
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_qwen.batching.rows import MicroBatch, ScheduleShape
from megatron_qwen.batching.source import UpdateBatch
from megatron_qwen.models.router import micro_batch_tokens
from megatron_qwen.models.spec import default_layer_impl
from megatron_qwen.training.loss import global_batch_totals, make_loss_func


def device() -> torch.device:
    """Where this rank's tensors live (in CPU mode ``current_device()`` is the CPU)."""
    return torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _device_fields() -> tuple[str, ...]:
    """The micro-batch tensors the model reads on the device.

    Transformer Engine's kernels read ``cu_seqlens`` on the GPU. The local spec only slices the packed
    sequence at those boundaries (our attention and megatron's unfused THD RoPE call ``.tolist()`` on them in
    every layer), which on a device tensor would stall the GPU queue several times per layer; on the host it
    costs nothing.
    """
    fields = ("tokens", "labels", "loss_mask", "position_ids")
    return fields + ("cu_seqlens",) if default_layer_impl() == "te" else fields


def _on_device(batch: MicroBatch) -> MicroBatch:
    moved = {
        name: getattr(batch, name).to(device(), non_blocking=True)
        for name in _device_fields()
        if getattr(batch, name) is not None
    }
    return dataclasses.replace(batch, **moved)


def _routing_padding_mask(batch: MicroBatch, model) -> torch.Tensor | None:
    """For a mixture of experts: the micro-batch's counts for its routers' losses (``models/router.py``), and the
    padding positions its routers leave out of their losses and load, as this stage's layers see the sequence.
    ``None`` for a dense model, and for an all-padding micro-batch (whose router losses then weigh nothing: megatron's
    load-balancing loss over no token would divide by zero)."""
    config = get_attr_wrapped_model(model, "config")
    if not config.num_moe_experts:
        return None
    real = int((~batch.padding_mask).sum())
    micro_batch_tokens(int(batch.loss_mask.sum()), real)
    if not real:
        return None
    mask = batch.padding_mask.to(device(), non_blocking=True)
    if config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
        # GPTModel splits the mask into sequence-parallel shards on the first stage only
        mask = tensor_parallel.scatter_to_sequence_parallel_region(mask.transpose(0, 1).contiguous())
        mask = mask.transpose(0, 1).contiguous()
    return mask


def forward_step(data_iterator, model):
    """megatron's ``forward_step_func``: per-token losses on the last stage, hidden states elsewhere."""
    batch = next(data_iterator)
    padding_mask = _routing_padding_mask(batch, model)
    batch = _on_device(batch)
    output = model(
        batch.tokens,
        batch.position_ids,
        None,
        labels=batch.labels,
        packed_seq_params=batch.packed_seq_params(),
        padding_mask=padding_mask,
    )
    return output, make_loss_func(batch.loss_mask)


def run_pipeline(chunks: list, micro_batches: list[MicroBatch], shape: ScheduleShape, forward_only: bool):
    """Forward (and backward) over ``micro_batches`` through megatron's pipeline schedule; returns the loss
    function's logging dicts (on the last stage)."""
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        forward_only=forward_only,
    )


def _loss_everywhere(forward_data_store: list) -> tuple[float, int]:
    """(token-weighted loss, supervised tokens) of the global batch: computed on the last stage, sent to every
    stage, with one host sync."""
    totals = global_batch_totals(forward_data_store, parallel_state.get_data_parallel_group())
    if totals is None:
        totals = torch.zeros(2, dtype=torch.float32, device=device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    loss_sum, supervised = totals.tolist()
    return (loss_sum / supervised if supervised else float("nan")), int(supervised)


@dataclasses.dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int
    supervised_tokens: int
    conversations: int
    rows: int


def train_step(chunks, optimizer, scheduler, batch: UpdateBatch, shape: ScheduleShape) -> StepResult:
    """One update: forward and backward over this rank's micro-batches of ``batch``, then one optimizer step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    store = run_pipeline(chunks, batch.micro_batches, shape, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    loss, supervised = _loss_everywhere(store)
    return StepResult(
        loss=loss,
        grad_norm=float("nan") if grad_norm is None else float(grad_norm),
        lr=lr,
        skipped=not updated,
        supervised_tokens=supervised,
        **batch.counts,
    )


def validation_loss(chunks, batches: list[list[MicroBatch]], shape: ScheduleShape) -> tuple[float, int]:
    """(token-weighted loss, supervised tokens) over every validation batch (dropout off)."""
    for chunk in chunks:
        chunk.eval()
    store = []
    with torch.no_grad():
        for micro_batches in batches:
            store += run_pipeline(chunks, micro_batches, shape, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _loss_everywhere(store)
