"""Qwen architectures as plain data.

A ``QwenConfig`` names everything that fixes a checkpoint's shapes and numerics; it knows nothing of
parallelism. ``PRESETS`` holds the published first-generation Qwen and Qwen2.5 shapes plus a tiny model
for tests and the CPU quickstart; ``from_hf_config`` reads the same fields from a Hugging Face
``config.json`` (either generation).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """One Qwen architecture. ``generation`` is ``"qwen"`` (first generation) or ``"qwen2"`` (Qwen2/2.5)."""

    name: str
    generation: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int  # per SwiGLU branch (first-generation config.json says twice this)
    vocab_size: int  # embedding rows as published (151936 or 152064), not the tokenizer's size
    rope_base: float
    norm_epsilon: float
    tied_embeddings: bool
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "QwenConfig":
        return cls(**data)


def _qwen1(name, hidden, layers, heads, ffn, vocab, rope_base=10000.0, max_pos=8192):
    return QwenConfig(name, "qwen", hidden, layers, heads, heads, ffn, vocab, rope_base, 1e-6, False, max_pos)


def _qwen25(name, hidden, layers, heads, groups, ffn, vocab, tied, eps=1e-6):
    return QwenConfig(name, "qwen2", hidden, layers, heads, groups, ffn, vocab, 1e6, eps, tied)


PRESETS: dict[str, QwenConfig] = {
    c.name: c
    for c in [
        QwenConfig("tiny", "qwen2", 64, 4, 4, 2, 128, 151936, 1e6, 1e-6, False, 2048),
        _qwen1("qwen-1.8b", 2048, 24, 16, 5504, 151936),
        _qwen1("qwen-7b", 4096, 32, 32, 11008, 151936),
        _qwen1("qwen-14b", 5120, 40, 40, 13696, 152064),
        _qwen1("qwen-72b", 8192, 80, 64, 24576, 152064, rope_base=1e6, max_pos=32768),
        _qwen25("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True),
        _qwen25("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True),
        _qwen25("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, True),
        _qwen25("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False),
        _qwen25("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False, eps=1e-5),
        _qwen25("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, False, eps=1e-5),
        _qwen25("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, False, eps=1e-5),
    ]
}


def _qwen2_rope_base(hf: dict) -> float:
    # transformers 5 writes the base only inside "rope_parameters"; older releases write "rope_theta".
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return float(hf.get("rope_parameters", {}).get("rope_theta", 10000.0))


def from_hf_config(path: str | Path) -> QwenConfig:
    """Reads a first-generation (``QWenLMHeadModel``) or Qwen2 (``Qwen2ForCausalLM``) ``config.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    hf = json.loads(path.read_text())
    if hf.get("model_type") == "qwen":
        return QwenConfig(
            name=hf.get("_name_or_path") or path.parent.name,
            generation="qwen",
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf["num_attention_heads"],
            ffn_hidden_size=hf["intermediate_size"] // 2,
            vocab_size=hf["vocab_size"],
            rope_base=float(hf.get("rotary_emb_base", 10000.0)),
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", hf.get("seq_length", 8192)),
        )
    if hf.get("model_type") in ("qwen2", None) and "num_key_value_heads" in hf:
        return QwenConfig(
            name=hf.get("_name_or_path") or path.parent.name,
            generation="qwen2",
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf["num_key_value_heads"],
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            rope_base=_qwen2_rope_base(hf),
            norm_epsilon=hf["rms_norm_eps"],
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )
    raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is neither 'qwen' nor 'qwen2'")
