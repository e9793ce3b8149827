"""The Qwen1.5-MoE / Qwen2-MoE Hugging Face layout (``Qwen2MoeForCausalLM``): tensor names and ``config.json``.

Qwen2's attention names (``hf_qwen2``); each sparse layer's MLP is ``mlp.gate.weight`` (the router, one row per
expert: megatron's ``router.weight``), ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` per expert (global
expert ``e`` is megatron's ``local_experts.{e}`` in the EP1 model; gate and up become its ``linear_fc1``, gate first),
and the shared expert ``mlp.shared_expert.{gate,up,down}_proj.weight`` with its gate ``mlp.shared_expert_gate.weight``
(``[1, hidden]``: megatron's ``shared_experts.gate_weight``). Dense layers (``mlp_only_layers``) keep Qwen2's MLP
names. Qwen3-MoE (``hf_qwen3_moe``) uses the same expert names without the shared expert.

Published checkpoints store the per-expert names, and so does ``save_pretrained`` of ``transformers`` 5.25 (which
holds the experts fused in memory and splits them on save). A checkpoint written from that in-memory state dict
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` with each expert's gate rows first, ``mlp.experts.down_proj``
``[E, H, I]``) is read too (``PerExpertNames``); exports always use the per-expert names.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from megatron_qwen.checkpoint import hf_qwen2
from megatron_qwen.checkpoint.hf_io import HFCheckpointReader
from megatron_qwen.checkpoint.mapping import (Entry, MegatronLayer, gate_up, model_entries, rename, require_attention,
                                              require_experts)
from megatron_qwen.models.presets import QwenConfig

FORMAT = "qwen2_moe"


def entries(cfg: QwenConfig) -> Iterator[Entry]:
    """The mapping table for ``cfg``, in checkpoint order."""
    require_attention(cfg, qk_norm=False, layout="Qwen2MoeForCausalLM", use_instead="qwen3_moe")
    require_experts(cfg, moe=True, layout="Qwen2MoeForCausalLM")
    if cfg.moe_shared_expert_ffn_hidden_size is None:
        raise ValueError(f"{cfg.name} has no shared expert, which Qwen2MoeForCausalLM needs; use --format qwen3_moe")
    yield from model_entries(cfg, "model.embed_tokens.weight", "model.norm.weight", layer_entries)


def layer_entries(cfg: QwenConfig, index: int) -> Iterator[Entry]:
    """One decoder layer's entries: the generation's attention, then a dense or a mixture-of-experts MLP."""
    yield from hf_qwen2.attention_entries(cfg, index)
    if not cfg.is_moe_layer(index):
        yield from hf_qwen2.dense_mlp_entries(index)
        return
    hf, layer = f"model.layers.{index}.mlp.", MegatronLayer(index)
    yield rename(layer.router, hf + "gate.weight")
    for expert in range(cfg.num_experts):
        names = f"{hf}experts.{expert}."
        yield gate_up(layer.expert_fc1(expert), gate=names + "gate_proj.weight", up=names + "up_proj.weight")
        yield rename(layer.expert_fc2(expert), names + "down_proj.weight")
    if cfg.moe_shared_expert_ffn_hidden_size is not None:
        shared = hf + "shared_expert."
        yield gate_up(layer.shared_fc1, gate=shared + "gate_proj.weight", up=shared + "up_proj.weight")
        yield rename(layer.shared_fc2, shared + "down_proj.weight")
        yield rename(layer.shared_gate, hf + "shared_expert_gate.weight")


def moe_config_fields(cfg: QwenConfig) -> dict:
    """The mixture-of-experts fields both generations' ``config.json`` share."""
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "norm_topk_prob": cfg.moe_norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(cfg.moe_dense_layers),
        "output_router_logits": False,
    }


def hf_config(cfg: QwenConfig, dtype: torch.dtype) -> dict:
    """``config.json`` for ``Qwen2MoeForCausalLM``."""
    return {
        **hf_qwen2.hf_config(cfg, dtype),
        **moe_config_fields(cfg),
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "shared_expert_intermediate_size": cfg.moe_shared_expert_ffn_hidden_size,
        "qkv_bias": cfg.qkv_bias,
    }


_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)")


class PerExpertNames:
    """A checkpoint's tensors under the published per-expert names, whichever of the two layouts (module
    docstring) it stores: fused expert tensors are read one expert at a time, as their per-expert parts."""

    def __init__(self, reader: HFCheckpointReader, cfg: QwenConfig):
        self.dir = reader.dir
        self._reader = reader
        self._parts: dict[str, tuple[str, int, slice | None]] = {}  # per-expert name -> (fused name, expert, rows)
        rows = cfg.moe_ffn_hidden_size
        for name in reader.names():
            fused = _FUSED_EXPERTS.fullmatch(name)
            if not fused:
                continue
            prefix, kind = fused.groups()
            for expert in range(cfg.num_experts):
                if kind == "gate_up_proj":
                    self._parts[f"{prefix}{expert}.gate_proj.weight"] = (name, expert, slice(0, rows))
                    self._parts[f"{prefix}{expert}.up_proj.weight"] = (name, expert, slice(rows, 2 * rows))
                else:
                    self._parts[f"{prefix}{expert}.down_proj.weight"] = (name, expert, None)
        fused_names = {name for name, _, _ in self._parts.values()}
        self._names = [name for name in reader.names() if name not in fused_names] + list(self._parts)

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> torch.Tensor:
        if name not in self._parts:
            return self._reader.read(name)
        fused, expert, rows = self._parts[name]
        tensor = self._reader.read_index(fused, expert)
        return tensor if rows is None else tensor[rows].contiguous()

    def dtype(self) -> torch.dtype:
        return self._reader.dtype()
