"""The output layer's training loss without the logits of the whole micro-batch, and the padded vocabulary rows.

megatron-core's ``GPTModel`` trains through ``output_layer(hidden)`` (logits ``[s, b, V/tp]`` in the weight's
dtype) and ``vocab_parallel_cross_entropy``, which makes a float32 copy of them and keeps it for the backward:
for 2048 positions and Qwen's 151,936 rows, 0.62 GB of bf16 and 1.24 GB of float32 logits per micro-batch.
``output_layer_loss`` computes the same per-token loss one block of vocabulary rows at a time, in the forward
(a running max and sum of exponentials per position, as in an online softmax) and again in the backward
(the block's logits are recomputed from the saved hidden states and per-position log-sum-exp). Blocks run over
vocabulary rows rather than positions so that each block of the weight gradient is written once, in the
weight's dtype like megatron's own matrix product, with no float32 buffer of the whole ``[V/tp, h]`` gradient;
only the small ``[positions, h]`` hidden-state gradient is summed over blocks (in float32). Tensor parallelism
needs two all-reduces per micro-batch (MAX of the max, SUM of sum-exp and target logit), as megatron's.

This module also owns the knowledge of which of a rank's vocabulary rows are padding (``real_local_rows``):
the loss never computes them (no probability, zero gradient) and the logits hook of ``QwenGPTModel`` masks them
to -inf, so inference sees the softmax of the real rows only. ``QwenGPTModel`` adds no parameters: its
checkpoints are ``GPTModel``'s.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

# Float32 logits of one block. Wide enough that each matrix product stays large (32k vocabulary rows at
# 2048 positions), small next to the 1.24 GB of float32 logits megatron keeps for 2048 positions at TP1.
CHUNK_LOGIT_BYTES = 256 * 2**20


def real_local_rows(vocab_size: int, rows: int, tp_group) -> int:
    """How many of this rank's ``rows / tp`` vocabulary rows are real tokens; padding is the vocabulary's tail."""
    rows_per_rank = rows // dist.get_world_size(tp_group)
    first_row = dist.get_rank(tp_group) * rows_per_rank
    return min(max(vocab_size - first_row, 0), rows_per_rank)


def _logit_blocks(hidden: torch.Tensor, weight: torch.Tensor, real_rows: int, block_rows: int):
    """(first row, float32 logits of rows [first, first + block_rows)) over the real rows of ``weight``.

    The product runs in the weight's dtype, as megatron's linear layer does; the float32 copy is ours to
    modify in place."""
    for first in range(0, real_rows, block_rows):
        block = weight[first : min(first + block_rows, real_rows)]
        yield first, (hidden @ block.t()).float()


def _block_targets(local_labels: torch.Tensor, first: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each position's label is in the block, its column there or 0)."""
    column = local_labels - first
    in_block = (column >= 0) & (column < width)
    return in_block, torch.where(in_block, column, 0)


class _OutputCrossEntropy(torch.autograd.Function):
    """Per-position loss ``[n]`` (float32) from hidden states ``[n, h]``, this rank's weight shard and labels ``[n]``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, real_rows, block_rows, tp_group):
        local_labels = labels - dist.get_rank(tp_group) * weight.shape[0]
        positions = hidden.shape[0]
        running_max = torch.full((positions,), float("-inf"), device=hidden.device)
        sum_exp = torch.zeros(positions, device=hidden.device)
        target_logit = torch.zeros(positions, device=hidden.device)
        for first, logits in _logit_blocks(hidden, weight, real_rows, block_rows):
            in_block, column = _block_targets(local_labels, first, logits.shape[1])
            target_logit += torch.where(in_block, logits.gather(1, column[:, None])[:, 0], 0.0)
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            sum_exp = sum_exp * torch.exp(running_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            running_max = new_max
            del logits  # before the generator makes the next block
        global_max = running_max
        if dist.get_world_size(tp_group) > 1:
            global_max = running_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            # a rank without real rows has running_max -inf and sum_exp 0, which this keeps at 0
            sums = torch.stack([sum_exp * torch.exp(running_max - global_max), target_logit])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
            sum_exp, target_logit = sums
        log_sum_exp = global_max + torch.log(sum_exp)
        ctx.save_for_backward(hidden, weight, local_labels, log_sum_exp)
        ctx.real_rows, ctx.block_rows = real_rows, block_rows
        return log_sum_exp - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, log_sum_exp = ctx.saved_tensors
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device)
        grad_weight = torch.zeros_like(weight)  # padding rows keep a zero gradient
        positions = torch.arange(hidden.shape[0], device=hidden.device)
        for first, logits in _logit_blocks(hidden, weight, ctx.real_rows, ctx.block_rows):
            in_block, column = _block_targets(local_labels, first, logits.shape[1])
            grad_logits = logits.sub_(log_sum_exp[:, None]).exp_()  # softmax
            grad_logits[positions, column] -= in_block.float()
            grad_logits = grad_logits.mul_(grad_loss[:, None]).to(weight.dtype)
            torch.mm(grad_logits.t(), hidden, out=grad_weight[first : first + logits.shape[1]])
            grad_hidden += grad_logits @ weight[first : first + logits.shape[1]]
            del logits, grad_logits  # before the generator makes the next block
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None


def output_layer_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    real_rows: int,
    *,
    sequence_parallel: bool,
    tp_group,
    chunk_bytes: int = CHUNK_LOGIT_BYTES,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` (float32), as ``compute_language_model_loss(labels, output_layer(hidden))``.

    ``hidden`` is ``[s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism; ``[t, 1, h]`` for packed rows),
    ``weight`` this rank's ``[V/tp, h]`` shard, ``labels`` ``[b, s]`` global token ids. The input goes through
    the same tensor-parallel regions as in ``ColumnParallelLinear``, so its gradient is reduced as there.
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    block_rows = max(1, chunk_bytes // (4 * s * b))
    loss = _OutputCrossEntropy.apply(
        hidden.reshape(s * b, h), weight, labels.t().reshape(-1), real_rows, block_rows, tp_group
    )
    return loss.view(s, b).t().contiguous()


class QwenGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` with padded vocabulary rows masked and the blockwise training loss.

    ``real_vocab_size`` is the tokenizer's row count; ``vocab_size`` the padded one. The training loss
    (``labels`` given, last stage, no multi-token prediction, no inference context) goes through
    ``output_layer_loss``; every other call is megatron's ``_postprocess`` unchanged. The output weight's
    gradient reaches the parameter through ordinary autograd accumulation, where megatron's DDP hook moves it
    into ``main_grad``. ``loss_chunk_bytes`` bounds the float32 logits of one block.
    """

    def __init__(self, *args, real_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.loss_chunk_bytes = CHUNK_LOGIT_BYTES
        if self.post_process:
            self.real_local_rows = real_local_rows(real_vocab_size, self.vocab_size, self.pg_collection.tp)
            if real_vocab_size < self.vocab_size:
                self.output_layer.register_forward_hook(self._mask_padded_logits)

    def output_weight(self) -> torch.Tensor:
        """This rank's ``[V/tp, h]`` shard of the weight the logits are computed with (the embedding's when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _mask_padded_logits(self, output_layer, inputs, output):
        logits, bias = output
        # gathered logits (runtime_gather_output) hold every rank's rows, their padding is the global tail
        real = self.real_vocab_size if logits.shape[-1] == self.vocab_size else self.real_local_rows
        padded = torch.arange(logits.shape[-1], device=logits.device) >= real
        return logits.masked_fill(padded, float("-inf")), bias

    def _postprocess(self, hidden_states, labels=None, mtp_in_postprocess=None, inference_context=None, **kwargs):
        if (
            labels is None
            or not self.post_process
            or mtp_in_postprocess
            or self.config.mtp_num_layers is not None
            or inference_context is not None
            # megatron then computes the output weight's gradient later, from inputs the output layer buffers
            or self.config.defer_embedding_wgrad_compute
        ):
            return super()._postprocess(
                hidden_states=hidden_states,
                labels=labels,
                mtp_in_postprocess=mtp_in_postprocess,
                inference_context=inference_context,
                **kwargs,
            )
        return output_layer_loss(
            hidden_states,
            self.output_weight(),
            labels,
            self.real_local_rows,
            sequence_parallel=self.output_layer.sequence_parallel,
            tp_group=self.pg_collection.tp,
            chunk_bytes=self.loss_chunk_bytes,
        )
