"""Checks a conversion: the same token ids through ``transformers`` and through megatron-core.

The megatron model is built at the current TP/PP layout (``platform.distributed.initialize`` has
run), loaded from an iteration directory and run with megatron's own pipeline schedule; the rank
holding the last stage's first tensor-parallel shard gathers the full-vocabulary logits. The
reference is ``transformers``' class of the directory's layout (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``) on the Hugging Face directory; a first-generation directory is read through the converter's Qwen1 -> Qwen2 mapping
(``transformers`` itself has no first-generation model class), so for those only the megatron side is
independent. The reference runs on the host CPU, so the host needs room for the model in the compared dtype.

Compared per prompt: every logit, and the per-token loss (cross entropy of each next token).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.checkpoint import hf_qwen1, hf_qwen2, hf_qwen2_moe, hf_qwen3, hf_qwen3_moe, layout
from megatron_qwen.checkpoint.convert import empty_model
from megatron_qwen.checkpoint.hf_io import HFCheckpointReader
from megatron_qwen.checkpoint.mapping import from_megatron, to_megatron
from megatron_qwen.data.chatml import ChatMLRenderer, Message, with_system_prompt
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.models.build import gather_logits
from megatron_qwen.models.presets import QwenConfig, from_hf_config


@dataclasses.dataclass(frozen=True)
class Tolerance:
    logits: float
    loss: float


# Largest allowed absolute differences. float32: both sides compute the same sums in a different
# order (a random-weight Qwen-1.8B differed by 8.5e-6 in logits at TP2). bfloat16 keeps 8 bits of
# mantissa, so the two implementations' roundings drift apart over the layers (the same model:
# 0.15 in logits, 0.08 in per-token loss); a mapping error in a trained model (a swapped gate/up, a
# misordered QKV) moves logits by whole units.
TOLERANCES = {
    torch.float32: Tolerance(logits=1e-3, loss=1e-3),
    torch.bfloat16: Tolerance(logits=0.5, loss=0.25),
}

DEFAULT_CONVERSATIONS = (
    (Message("user", "What is the capital of France?"),
     Message("assistant", "The capital of France is Paris.")),
    (Message("system", "You are a terse assistant."),
     Message("user", "Write a haiku about tensor parallelism."),
     Message("assistant", "Split weights, shared work;\nall-reduce gathers the whole;\none model, many hands.")),
    (Message("user", "Translate to German: 'The weather is nice today.'"),),
)


@dataclasses.dataclass(frozen=True)
class Difference:
    logits: float  # largest |logit difference|
    loss: float  # largest |per-token loss difference|
    tokens: int

    def within(self, tolerance: Tolerance) -> bool:
        return self.logits <= tolerance.logits and self.loss <= tolerance.loss


def default_prompts(iteration_dir: str | Path, vocab_size: int) -> tuple[list[list[int]], str]:
    """The default conversations in ChatML, tokenized with the checkpoint's own tokenizer, and what they are. A
    model whose ``vocab_size`` embedding rows cannot hold the tokenizer's ids (a small test model) gets token ids
    drawn at random below ``vocab_size`` instead (seeded, of the same lengths)."""
    renderer = ChatMLRenderer(load_tokenizer(str(layout.tokenizer_dir(iteration_dir))))
    prompts = [renderer.render(with_system_prompt(list(conversation)))[0] for conversation in DEFAULT_CONVERSATIONS]
    if max(max(ids) for ids in prompts) < vocab_size:
        return prompts, "ChatML conversations"
    draw = torch.Generator().manual_seed(0)
    random = [torch.randint(vocab_size, (len(ids),), generator=draw).tolist() for ids in prompts]
    return random, f"random token ids (the tokenizer's ids do not fit the model's {vocab_size} embedding rows)"


def load_megatron(
    iteration_dir: str | Path, dtype: torch.dtype, layer_impl: str = "local"
) -> tuple[QwenConfig, torch.nn.Module]:
    """The model of ``iteration_dir`` at the current parallel layout, in ``dtype`` (the checkpoint's
    weights are cast on load), in eval mode."""
    cfg = layout.load_config(iteration_dir)
    model = empty_model(cfg, dtype, layer_impl=layer_impl)
    layout.load_model(model, iteration_dir)
    return cfg, model.eval()


def holds_output() -> bool:
    """True on the one rank that gets the full logits: last stage, first TP shard, first DP replica."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, cfg: QwenConfig, token_ids: list[int]) -> torch.Tensor | None:
    """Float32 logits ``[len(token_ids), vocab_size]`` on the rank ``holds_output``; None elsewhere."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens = torch.tensor([token_ids], dtype=torch.long, device=device)
    positions = torch.arange(len(token_ids), device=device).unsqueeze(0)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, attention_mask=None)
        return output, lambda logits, non_loss_data=False: gather_logits(logits, cfg).float()

    collected = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=len(token_ids),
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return collected[0][0].cpu() if holds_output() else None


def load_transformers(hf_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """The ``transformers`` model of a Qwen2, Qwen3, Qwen2-MoE or Qwen3-MoE directory, or ``Qwen2ForCausalLM`` for
    a first-generation one mapped to Qwen2."""
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = from_hf_config(Path(hf_dir) / "config.json")
    if cfg.generation != hf_qwen1.FORMAT:
        model_class = getattr(transformers, _TRANSFORMERS_CLASSES[cfg.generation])
        return model_class.from_pretrained(hf_dir, dtype=dtype).eval()
    reader = HFCheckpointReader(hf_dir)
    megatron = dict(to_megatron(hf_qwen1.entries(cfg), reader.read))
    state = dict(from_megatron(hf_qwen2.entries(cfg), megatron.__getitem__))
    model = Qwen2ForCausalLM(Qwen2Config(**hf_qwen2.hf_config(cfg, dtype))).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_head = {"lm_head.weight"} if cfg.tied_embeddings else set()
    if set(missing) - tied_head or unexpected:
        raise ValueError(f"{hf_dir}: mapped weights do not fit Qwen2ForCausalLM: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


_TRANSFORMERS_CLASSES = {
    hf_qwen2.FORMAT: "Qwen2ForCausalLM",
    hf_qwen3.FORMAT: "Qwen3ForCausalLM",
    hf_qwen2_moe.FORMAT: "Qwen2MoeForCausalLM",
    hf_qwen3_moe.FORMAT: "Qwen3MoeForCausalLM",
}


@torch.no_grad()
def transformers_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()


def per_token_loss(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Cross entropy of each next token: ``[len(token_ids) - 1]``."""
    return F.cross_entropy(logits[:-1], torch.tensor(token_ids[1:]), reduction="none")


def difference(reference: torch.Tensor, candidate: torch.Tensor, token_ids: list[int]) -> Difference:
    return Difference(
        logits=(reference - candidate).abs().max().item(),
        loss=(per_token_loss(reference, token_ids) - per_token_loss(candidate, token_ids)).abs().max().item(),
        tokens=len(token_ids),
    )
