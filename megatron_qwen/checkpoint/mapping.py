"""A Hugging Face <-> megatron-core mapping as a table of entries, and the two walks over it.

Each ``Entry`` ties one parameter of the TP1/PP1 megatron-core model (local-spec names, as in
``GPTModel.state_dict()``) to the Hugging Face tensors it is made of, with the functions that fuse
them and split it again. A layout module (``hf_qwen1``, ``hf_qwen2``, ``hf_qwen3``) only lists its entries;
``to_megatron`` and ``from_megatron`` stream over any such list one entry at a time, so at most one
entry's tensors are alive beyond what the caller keeps.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import torch

from megatron_qwen.checkpoint import fused
from megatron_qwen.models.presets import QwenConfig

Read = Callable[[str], torch.Tensor]

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
HF_OUTPUT_LAYER = "lm_head.weight"  # the same name in both Hugging Face layouts


@dataclasses.dataclass(frozen=True)
class MegatronLayer:
    """Names of layer ``index``'s parameters in the TP1/PP1 model."""

    index: int

    def _name(self, suffix: str) -> str:
        return f"decoder.layers.{self.index}.{suffix}"

    @property
    def input_norm(self) -> str:
        return self._name("input_layernorm.weight")

    @property
    def qkv_weight(self) -> str:
        return self._name("self_attention.linear_qkv.weight")

    @property
    def qkv_bias(self) -> str:
        return self._name("self_attention.linear_qkv.bias")

    @property
    def q_norm(self) -> str:
        return self._name("self_attention.q_layernorm.weight")

    @property
    def k_norm(self) -> str:
        return self._name("self_attention.k_layernorm.weight")

    @property
    def attention_out(self) -> str:
        return self._name("self_attention.linear_proj.weight")

    @property
    def mlp_norm(self) -> str:
        return self._name("pre_mlp_layernorm.weight")

    @property
    def fc1(self) -> str:
        return self._name("mlp.linear_fc1.weight")

    @property
    def fc2(self) -> str:
        return self._name("mlp.linear_fc2.weight")

    @property
    def router(self) -> str:
        return self._name("mlp.router.weight")

    def expert_fc1(self, expert: int) -> str:
        return self._name(f"mlp.experts.local_experts.{expert}.linear_fc1.weight")

    def expert_fc2(self, expert: int) -> str:
        return self._name(f"mlp.experts.local_experts.{expert}.linear_fc2.weight")

    @property
    def shared_fc1(self) -> str:
        return self._name("mlp.shared_experts.linear_fc1.weight")

    @property
    def shared_fc2(self) -> str:
        return self._name("mlp.shared_experts.linear_fc2.weight")

    @property
    def shared_gate(self) -> str:
        return self._name("mlp.shared_experts.gate_weight")


def _single(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _as_tuple(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One megatron parameter and the Hugging Face tensors it is made of (a rename when just one)."""

    megatron: str
    hf: tuple[str, ...]
    fuse: Callable[[list[torch.Tensor]], torch.Tensor] = _single
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _as_tuple


def rename(megatron: str, hf: str) -> Entry:
    return Entry(megatron, (hf,))


def gate_up(fc1: str, gate: str, up: str) -> Entry:
    """megatron's fused SwiGLU input projection from the separate gate and up projections."""
    return Entry(fc1, (gate, up), fuse=lambda gate_up: fused.fuse_gate_up(*gate_up), split=fused.split_gate_up)


def model_entries(
    cfg: QwenConfig,
    embedding: str,
    final_norm: str,
    layer_entries: Callable[[QwenConfig, int], Iterable[Entry]],
) -> Iterator[Entry]:
    """A whole model's table in checkpoint order: the embedding, each layer's entries, the final
    norm, and the output layer unless it is tied to the embedding."""
    yield rename(EMBEDDING, embedding)
    for index in range(cfg.num_layers):
        yield from layer_entries(cfg, index)
    yield rename(FINAL_NORM, final_norm)
    if not cfg.tied_embeddings:
        yield rename(OUTPUT_LAYER, HF_OUTPUT_LAYER)


def require_attention(cfg: QwenConfig, qk_norm: bool, layout: str, use_instead: str) -> None:
    """Refuses a model whose attention ``layout`` cannot hold: Qwen3's (query/key norms, no QKV bias) when
    ``qk_norm``, the earlier generations' (a QKV bias, no norms) otherwise."""
    if cfg.qk_norm == qk_norm and cfg.qkv_bias != qk_norm:
        return
    has = "query/key norms and no QKV bias" if cfg.qk_norm else "a QKV bias and no query/key norms"
    raise ValueError(f"{cfg.name} has {has}, which {layout} cannot hold; use --format {use_instead}")


def require_experts(cfg: QwenConfig, moe: bool, layout: str) -> None:
    """Refuses a mixture of experts for a dense ``layout`` and a dense model for a mixture-of-experts one."""
    if cfg.is_moe != moe:
        kind = "a mixture of experts" if cfg.is_moe else "a dense model"
        raise ValueError(f"{cfg.name} is {kind}, which {layout} cannot hold; use --format {cfg.generation}")


def to_megatron(entries: Iterable[Entry], read: Read) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) for each entry, reading its Hugging Face tensors only when reached."""
    for entry in entries:
        yield entry.megatron, entry.fuse([read(name) for name in entry.hf])


def from_megatron(entries: Iterable[Entry], read: Read) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for each entry's parts, reading each megatron tensor once."""
    for entry in entries:
        parts = entry.split(read(entry.megatron))
        if len(parts) != len(entry.hf):
            raise AssertionError(f"{entry.megatron} split into {len(parts)} tensors, expected {len(entry.hf)}")
        yield from zip(entry.hf, parts)


def ignorable(tied_embeddings: bool, name: str) -> bool:
    """Tensors a published checkpoint of either generation may carry that the model does not need:
    RoPE's precomputed frequencies, and ``lm_head.weight`` next to tied embeddings."""
    return (tied_embeddings and name == HF_OUTPUT_LAYER) or name.endswith("rotary_emb.inv_freq")
