"""The router of every mixture-of-experts layer: megatron-core's ``TopKRouter`` with the load-balancing and z losses
weighted per supervised token, and each layer's load counted for the log (``router_statistics``).

The losses an update minimizes (docs/training.md), for micro-batches m of the whole update (every data-parallel
rank), s_m of whose positions are supervised (S = sum of s_m) and T_m of which are not padding:

    LM loss + moe_aux_loss_coeff x sum over MoE layers and m of (s_m / S) x aux(layer, m)
            + moe_z_loss_coeff   x sum over MoE layers and m of (s_m / S) x z(layer, m)

``aux(layer, m)`` is megatron's switch load-balancing loss over the micro-batch's T_m non-padding tokens,
``E / (k T_m^2) x sum_e count_e x sum_x p_e(x)`` (E experts, k per token, ``count_e`` tokens routed to expert e,
``p_e(x)`` the softmax over all experts of token x's router logits); ``z(layer, m)`` is the mean over those tokens
of ``logsumexp(logits)^2``. Each supervised token carries its micro-batch's router losses, averaged like the LM
loss, so their weight does not depend on how the update is split into micro-batches and ranks nor on how many
positions are prompts or padding.

Why the override: with ``calculate_per_token_loss`` megatron multiplies each micro-batch's aux loss by the
non-padding tokens on this rank (and the z-loss by the same count, with its coefficient divided by the TP size),
and ``finalize_model_grads`` divides every gradient by S: the aux term's weight then grows with the ratio of all
tokens to supervised tokens, and under sequence parallelism the TP shards of one micro-batch weigh their share
of it by their own token counts. Here every shard attaches its share of ``aux(layer, m)`` times s_m (the shares
sum to the micro-batch's loss: each holds its tokens' probabilities against the counts of the whole
micro-batch), and its share of ``z`` (its tokens' squares over T_m) times s_m.

s_m and T_m are known on the host; ``step.forward_step`` hands them over before the micro-batch's forward
(``micro_batch_tokens``). With full activation recomputation the router runs again in the backward pass, after
later micro-batches' forwards: the first, gradient-free pass of each micro-batch queues its counts for that
recomputation (backward passes run in the order of the forwards, per model chunk).
"""
from __future__ import annotations

import collections
import dataclasses

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter


@dataclasses.dataclass(frozen=True)
class MicroBatchTokens:
    supervised: int
    real: int  # positions that are not padding


_current = MicroBatchTokens(0, 0)


def micro_batch_tokens(supervised: int, real: int) -> None:
    """The counts of the micro-batch whose forward comes next (``step.forward_step``)."""
    global _current
    _current = MicroBatchTokens(supervised, real)


class QwenRouter(TopKRouter):
    """megatron's top-k router, its losses weighted per supervised token (module docstring), counting how many
    non-padding tokens each expert receives in training."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.tokens = _current
        self.queued = collections.deque()  # counts of checkpointed forwards, for their recomputation
        self.recomputed = config.recompute_granularity == "full"
        device = self.weight.device
        # buffers, so that they follow the module to its device; not part of checkpoints
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_moe_experts, dtype=torch.float64,
                                                              device=device), persistent=False)
        self.register_buffer("aux_sum", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("z_sum", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        counting = self.training and torch.is_grad_enabled()
        if self.recomputed and self.training and not torch.is_grad_enabled():
            self.queued.append(_current)  # the first pass of a recomputed layer
        self.tokens = self.queued.popleft() if counting and self.queued else _current
        probs, routing_map = super().forward(input, padding_mask)
        if counting and self.tokens.real:
            routed = routing_map if padding_mask is None else routing_map & ~padding_mask.reshape(-1, 1)
            self.tokens_per_expert += routed.sum(dim=0)
        return probs, routing_map

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        self.aux_sum += aux_loss.detach().double() * self.tokens.supervised / aux_loss_coeff
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, reduce_group_has_dp,
            valid_token_count=self.tokens.supervised,
        )

    def apply_z_loss(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not (self.training and torch.is_grad_enabled()):
            return logits
        squares = torch.logsumexp(logits.float(), dim=-1).square()
        if padding_mask is not None:
            squares = squares.masked_fill(padding_mask, 0.0)
        share = squares.sum() / max(self.tokens.real, 1)  # this shard's part of the micro-batch's mean
        self.z_sum += share.detach().double() * self.tokens.supervised
        return MoEAuxLossAutoScaler.apply(logits, coeff * self.tokens.supervised * share)


def routers(chunks: list) -> list[QwenRouter]:
    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, QwenRouter)]


def router_statistics(chunks: list, supervised_tokens: int) -> dict[str, list]:
    """Each MoE layer's load and router losses since the last call, over every rank (one all-reduce; collective: every
    rank of a mixture of experts calls it, pipeline stages without a sparse layer too): ``layers`` (numbered from 0),
    ``load_max_over_mean`` (the most tokens any expert received over the mean per expert: 1 when balanced, E / k when
    every token goes to the same k experts), ``load_min_over_mean``, and, when they are on, ``aux_loss`` and
    ``z_loss`` (per supervised token, before their coefficients; ``supervised_tokens``: the S of the updates since
    the last call)."""
    config = chunks[0].config
    experts = config.num_moe_experts
    device = next(chunks[0].parameters()).device
    table = torch.zeros(config.num_layers, experts + 3, dtype=torch.float64, device=device)
    for router in routers(chunks):
        row = table[router.layer_number - 1]
        row[:experts] = router.tokens_per_expert
        row[experts], row[experts + 1], row[experts + 2] = router.aux_sum, router.z_sum, 1.0
        for accumulator in (router.tokens_per_expert, router.aux_sum, router.z_sum):
            accumulator.zero_()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(table)
    rows = [(layer, values) for layer, values in enumerate(table.tolist()) if values[experts + 2]]
    statistics = {"layers": [layer for layer, _ in rows]}
    loads = [values[:experts] for _, values in rows]
    means = [sum(load) / experts for load in loads]
    statistics["load_max_over_mean"] = [max(load) / mean if mean else 0.0 for load, mean in zip(loads, means)]
    statistics["load_min_over_mean"] = [min(load) / mean if mean else 0.0 for load, mean in zip(loads, means)]
    per_token = max(supervised_tokens, 1)
    if config.moe_aux_loss_coeff:
        statistics["aux_loss"] = [values[experts] / per_token for _, values in rows]
    if config.moe_z_loss_coeff is not None:
        statistics["z_loss"] = [values[experts + 1] / per_token for _, values in rows]
    return statistics
