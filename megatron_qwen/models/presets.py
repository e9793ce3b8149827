"""Qwen architectures as plain data.

A ``QwenConfig`` names everything that fixes a checkpoint's shapes and numerics; it knows nothing of
parallelism. ``PRESETS`` holds the published first-generation Qwen, Qwen2.5, Qwen3 (dense) and the mixture-of-
experts Qwen1.5-MoE/Qwen2-MoE and Qwen3-MoE shapes, plus tiny models for tests and the CPU quickstart;
``from_hf_config`` reads the same fields from a Hugging Face ``config.json`` of any of these generations.

The generations differ in two switches besides their shapes: Qwen and Qwen2/2.5 have a bias on the QKV
projection; Qwen3 has none, normalizes each head's query and key (RMSNorm over ``head_dim``, one weight
shared by all heads) before the rotary embedding, and sets ``head_dim`` on its own (128), which need not be
``hidden_size / num_attention_heads``.

The mixtures of experts (``generation`` ``"qwen2_moe"``: Qwen1.5-MoE and Qwen2-MoE; ``"qwen3_moe"``) keep their
generation's attention and replace the MLP of each sparse layer by ``num_experts`` SwiGLU experts of
``moe_ffn_hidden_size``, of which a router picks ``moe_router_topk`` per token; layers listed in
``moe_dense_layers`` keep a dense MLP of ``ffn_hidden_size``. ``moe_norm_topk_prob`` is ``transformers``'
``norm_topk_prob``: whether the chosen experts' softmax probabilities are renormalized to sum to one (Qwen3-MoE)
or used as they are (Qwen2-MoE). Qwen2-MoE adds a shared expert (``moe_shared_expert_ffn_hidden_size``) whose
output every token gets, scaled by a sigmoid gate. A dense model leaves all of these at their defaults, and its
``model_config.json`` does not name them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """One Qwen architecture. ``generation`` is ``"qwen"`` (first generation), ``"qwen2"`` (Qwen2/2.5) or
    ``"qwen3"``; it names the Hugging Face layout, while the fields below fix the model."""

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
    head_dim: int | None = None  # as Qwen3's config.json states it; None: hidden_size // num_attention_heads
    qkv_bias: bool = True
    qk_norm: bool = False
    num_experts: int | None = None  # routed experts of each sparse layer; None: a dense model
    moe_ffn_hidden_size: int | None = None  # per SwiGLU branch of one expert
    moe_router_topk: int | None = None  # experts per token
    moe_norm_topk_prob: bool = False
    moe_shared_expert_ffn_hidden_size: int | None = None  # Qwen2-MoE's gated shared expert
    moe_dense_layers: tuple[int, ...] = ()  # layers with a dense MLP of ffn_hidden_size

    @property
    def kv_channels(self) -> int:
        """The size of each attention head (megatron's name)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index not in self.moe_dense_layers

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.is_moe:  # a dense model's file stays as it was before these fields existed
            fields = {name: value for name, value in fields.items() if name not in _MOE_FIELDS}
        return json.dumps(fields, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "QwenConfig":
        if "moe_dense_layers" in data:
            data = {**data, "moe_dense_layers": tuple(data["moe_dense_layers"])}
        return cls(**data)


_MOE_FIELDS = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_norm_topk_prob",
               "moe_shared_expert_ffn_hidden_size", "moe_dense_layers")


def _qwen1(name, hidden, layers, heads, ffn, vocab, rope_base=10000.0, max_pos=8192):
    return QwenConfig(name, "qwen", hidden, layers, heads, heads, ffn, vocab, rope_base, 1e-6, False, max_pos)


def _qwen25(name, hidden, layers, heads, groups, ffn, vocab, tied, eps=1e-6):
    return QwenConfig(name, "qwen2", hidden, layers, heads, groups, ffn, vocab, 1e6, eps, tied)


def _qwen3(name, hidden, layers, heads, ffn, tied):
    return QwenConfig(name, "qwen3", hidden, layers, heads, 8, ffn, 151936, 1e6, 1e-6, tied, 40960,
                      head_dim=128, qkv_bias=False, qk_norm=True)


def _qwen2_moe(name, hidden, layers, heads, groups, ffn, experts, topk, expert_ffn, shared_ffn, max_pos):
    return QwenConfig(name, "qwen2_moe", hidden, layers, heads, groups, ffn, 151936, 1e6, 1e-6, False,
                      max_pos, num_experts=experts, moe_ffn_hidden_size=expert_ffn, moe_router_topk=topk,
                      moe_shared_expert_ffn_hidden_size=shared_ffn)


def _qwen3_moe(name, hidden, layers, heads, groups, ffn, expert_ffn, max_pos=40960, rope_base=1e6):
    return QwenConfig(name, "qwen3_moe", hidden, layers, heads, groups, ffn, 151936, rope_base, 1e-6,
                      False, max_pos, head_dim=128, qkv_bias=False, qk_norm=True, num_experts=128,
                      moe_ffn_hidden_size=expert_ffn, moe_router_topk=8, moe_norm_topk_prob=True)


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
        _qwen3("qwen3-0.6b", 1024, 28, 16, 3072, True),
        _qwen3("qwen3-1.7b", 2048, 28, 16, 6144, True),
        _qwen3("qwen3-4b", 2560, 36, 32, 9728, True),
        _qwen3("qwen3-8b", 4096, 36, 32, 12288, False),
        _qwen3("qwen3-14b", 5120, 40, 40, 17408, False),
        _qwen3("qwen3-32b", 5120, 64, 64, 25600, False),
        # a sparse first layer and a dense second one, so that CPU runs exercise both kinds
        QwenConfig("tiny-moe", "qwen3_moe", 64, 2, 4, 2, 128, 151936, 1e6, 1e-6, False, 2048, head_dim=16,
                   qkv_bias=False, qk_norm=True, num_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
                   moe_norm_topk_prob=True, moe_dense_layers=(1,)),
        _qwen2_moe("qwen1.5-moe-a2.7b", 2048, 24, 16, 16, 5632, 60, 4, 1408, 5632, 8192),
        _qwen2_moe("qwen2-57b-a14b", 3584, 28, 28, 4, 18944, 64, 8, 2560, 20480, 32768),
        _qwen3_moe("qwen3-30b-a3b", 2048, 48, 32, 4, 6144, 768),
        _qwen3_moe("qwen3-235b-a22b", 4096, 94, 64, 4, 12288, 1536),
        _qwen3_moe("qwen3-coder-30b-a3b", 2048, 48, 32, 4, 6144, 768, max_pos=262144, rope_base=1e7),
    ]
}


def _rope_base(hf: dict, where: Path) -> float:
    """The RoPE base of a Qwen2/Qwen3 ``config.json``; scaled variants (YaRN, dynamic NTK) are refused."""
    # transformers 5 writes the base only inside "rope_parameters"; older releases write "rope_theta".
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{where}: RoPE scaling {rope_type!r} is not implemented; remove it from config.json "
                         "to train at the pretraining context length")
    return float(hf.get("rope_theta", parameters.get("rope_theta", 10000.0)))


def _model_name(hf: dict, config_path: Path) -> str:
    """What a converted model is called: the name its ``config.json`` records, else its folder's when that names a
    Qwen model (for a Hugging Face cache snapshot, whose folder is a commit hash, the repository's), else its
    architecture and folder (``Qwen2ForCausalLM (hf)``: an export's folder is often named after the format only)."""
    if hf.get("_name_or_path"):
        return Path(hf["_name_or_path"]).name
    folder = config_path.resolve().parent
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        folder = Path(folder.parent.parent.name.split("--")[-1])
    if "qwen" in folder.name.lower():
        return folder.name
    return f"{(hf.get('architectures') or [hf.get('model_type', 'qwen')])[0]} ({folder.name})"


def from_hf_config(path: str | Path) -> QwenConfig:
    """Reads a first-generation (``QWenLMHeadModel``), Qwen2 (``Qwen2ForCausalLM``), Qwen3 (``Qwen3ForCausalLM``),
    Qwen2-MoE (``Qwen2MoeForCausalLM``) or Qwen3-MoE (``Qwen3MoeForCausalLM``) ``config.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    hf = json.loads(path.read_text())
    name = _model_name(hf, path)
    if hf.get("model_type") == "qwen":
        return QwenConfig(
            name=name,
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
    generation = hf.get("model_type") or "qwen2"
    if generation not in _GENERATIONS or "num_key_value_heads" not in hf:
        known = ", ".join(repr(known) for known in ("qwen",) + _GENERATIONS)
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not one of {known}")
    qwen3 = generation.startswith("qwen3")
    if qwen3 and hf.get("attention_bias", False):
        raise ValueError(f"{path}: attention_bias is true; Qwen3 checkpoints have no attention biases")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{path}: sliding-window attention is not implemented (use_sliding_window is true)")
    return QwenConfig(
        name=name,
        generation=generation,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_key_value_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rope_base=_rope_base(hf, path),
        norm_epsilon=hf["rms_norm_eps"],
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        head_dim=hf.get("head_dim", 128) if qwen3 else None,  # transformers' Qwen3 default
        qkv_bias=generation == "qwen2" or (generation == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_norm=qwen3,
        **(_moe_fields(hf, path) if generation.endswith("_moe") else {}),
    )


_GENERATIONS = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def _moe_fields(hf: dict, where: Path) -> dict:
    """The mixture-of-experts fields of a Qwen2-MoE or Qwen3-MoE ``config.json`` (defaults as ``transformers``')."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes Qwen3-MoE's under the latter
    if not experts:
        raise ValueError(f"{where}: a mixture-of-experts config.json without num_experts")
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    # transformers' rule: layer i is sparse unless listed in mlp_only_layers or (i + 1) is not a multiple of the step
    dense_layers = tuple(i for i in range(hf["num_hidden_layers"]) if i in dense or (i + 1) % step)
    shared = hf.get("shared_expert_intermediate_size") if hf["model_type"] == "qwen2_moe" else None
    if hf["model_type"] == "qwen2_moe" and not shared:
        raise ValueError(f"{where}: Qwen2-MoE without shared_expert_intermediate_size")
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_shared_expert_ffn_hidden_size=shared,
        moe_dense_layers=dense_layers,
    )
