"""Model FLOPs of a training step and MFU: the one formula used by the trainer's log and the benchmark.

Megatron's accounting (matrix multiplications only, 2 FLOPs per multiply-add; norms, RoPE, softmax and the
loss ignored). Per token and per layer, forward, with hidden size ``h``, ``n`` query heads and ``g`` key/value
groups of head size ``d``, SwiGLU width ``f`` and row length ``S``:

- QKV projection: ``2 * h * (n + 2 g) * d``;  output projection: ``2 * n * d * h``
- attention: ``2 * S * n * d`` for the scores ``Q K^T`` plus ``2 * S * n * d`` for ``softmax · V``, over the
  full row ``S`` (no halving for causality, and a packed row counts as one sequence: the convention others
  report, so numbers compare);
- SwiGLU MLP: three ``h x f`` matrices, ``2 * 3 * h * f``; in a mixture-of-experts layer, the experts a token
  is routed to (``k`` of expert width ``f_e``: ``6 * h * f_e * k``), the shared expert where there is one (width
  ``f_s``: ``6 * h * f_s``, plus its gate ``2 * h``) and the router (``2 * h * E`` for ``E`` experts) in its place:
  what a token activates, not the experts it skips;

plus, once per token, the logits layer ``2 * h * V`` (``V`` = embedding rows). A training step costs three
times the forward (backward = 2x forward), times the number of non-padding tokens of the step:

    step_flops = 3 * tokens * (L * (2hd(n + 2g) + 2ndh + 4Snd + 6hf) + 2hV)

For dense Qwen (``n * d = h``) this is Megatron-LM's closed form, per token
``12 L h^2 (1 + g/n + S/h + 1.5 f/h) + 6 h V``.
"""
from __future__ import annotations

H100_SXM_BF16_DENSE_PEAK = 989e12


def forward_flops_per_token(model, seq_length: int) -> int:
    """Forward FLOPs for one token of a row of ``seq_length``; ``model`` is a ``QwenConfig``."""
    h, d = model.hidden_size, model.kv_channels
    n, g = model.num_attention_heads, model.num_query_groups
    qkv = 2 * h * (n + 2 * g) * d
    attention_output = 2 * n * d * h
    attention = 4 * seq_length * n * d
    mlp = sum(_mlp_flops(model, index) for index in range(model.num_layers))
    logits = 2 * h * model.vocab_size
    return model.num_layers * (qkv + attention_output + attention) + mlp + logits


def _mlp_flops(model, index: int) -> int:
    """Forward FLOPs per token of layer ``index``'s MLP: the dense one, or what a token activates of the experts."""
    h = model.hidden_size
    if not model.is_moe_layer(index):
        return 6 * h * model.ffn_hidden_size
    shared = model.moe_shared_expert_ffn_hidden_size
    shared_flops = 6 * h * shared + 2 * h if shared else 0
    return 6 * h * model.moe_ffn_hidden_size * model.moe_router_topk + shared_flops + 2 * h * model.num_experts


def step_flops(model, seq_length: int, num_tokens: int) -> int:
    """Model FLOPs of a training step (forward and backward) over ``num_tokens`` non-padding tokens."""
    return 3 * num_tokens * forward_flops_per_token(model, seq_length)


def mfu(flops: float, seconds: float, num_gpus: int, peak_flops_per_gpu: float = H100_SXM_BF16_DENSE_PEAK) -> float:
    """Model FLOPs utilization: achieved model FLOP/s per GPU over the GPU's peak."""
    return flops / seconds / num_gpus / peak_flops_per_gpu
