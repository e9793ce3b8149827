"""The blockwise output-layer loss (models/output_loss.py) against megatron-core's own path, on the same weights.

Usage: python output_loss_checks.py OUT.json                         (TP1, one process)
       torchrun --nproc-per-node 2 output_loss_checks.py OUT.json    (TP2, with and without sequence parallelism)

megatron's path is ``GPTModel._postprocess``: ``output_layer`` (with the padded-row mask) and
``compute_language_model_loss``. Each check writes the largest differences it measured (all-reduced MAX over
the tensor-parallel ranks) to OUT.json, for pytest to judge.
"""
import dataclasses
import json
import os
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 1000  # padded to 1024 rows: the last rank's shard holds padding
SEQ, BATCH = 64, 2  # 128 positions: the whole logits (128 x 1024) outsize the weight (1024 x 64)
BLOCK_ROWS = 300  # does not divide the 1000 real rows, nor a TP2 rank's 512 or 488


def tiny_config(tied):
    from megatron_qwen.models.presets import PRESETS

    return dataclasses.replace(PRESETS["tiny"], vocab_size=VOCAB, tied_embeddings=tied)


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor(float(value))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def relative_diff(got, expected) -> float:
    return max_over_ranks(((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item())


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any operation makes, except views of a weight ``[v, h]``."""

    def __init__(self, weight_shape):
        super().__init__()
        self.skip, self.largest = {tuple(weight_shape), tuple(weight_shape)[::-1]}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) not in self.skip:
                self.largest = max(self.largest, tensor.numel())
        return out


def loss_and_grads(postprocess, model, hidden, labels, grad_loss):
    """Per-token loss and the gradients of ``sum(loss * grad_loss)`` w.r.t. the hidden states and output weight."""
    from megatron_qwen.models.output_loss import QwenGPTModel

    weight = model.output_weight()
    hidden = hidden.detach().requires_grad_()
    weight.grad = None
    probe = LargestOutput(weight.shape)
    with probe:
        kwargs = dict(input_ids=None, position_ids=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None)
        loss = postprocess(model, hidden_states=hidden, labels=labels, **kwargs)
        (loss * grad_loss).sum().backward()
    assert isinstance(model, QwenGPTModel)
    return loss.detach(), hidden.grad, weight.grad.clone(), probe.largest


def compare_postprocess(*, tied, dtype, sequence_parallel, packed):
    """Loss and gradients of one output layer through both paths, on random hidden states."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_qwen.models.build import build_model

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    seq, batch = (SEQ * BATCH, 1) if packed else (SEQ, BATCH)  # packed rows arrive as [t, 1, h] and [1, t]
    torch.manual_seed(3)
    model = build_model(
        tiny_config(tied), params_dtype=dtype, bf16=dtype == torch.bfloat16, sequence_parallel=sequence_parallel
    )
    hidden = torch.randn(seq, batch, model.config.hidden_size).to(dtype)
    labels = torch.randint(0, VOCAB, (batch, seq))
    labels[0, :4] = torch.tensor([0, 511, 512, VOCAB - 1])  # the first and last rows of each TP2 shard
    grad_loss = torch.rand(batch, seq)
    if sequence_parallel:
        hidden = hidden.chunk(tp)[rank]
    model.loss_chunk_bytes = 4 * seq * batch * BLOCK_ROWS
    ours = loss_and_grads(type(model)._postprocess, model, hidden, labels, grad_loss)
    megatrons = loss_and_grads(GPTModel._postprocess, model, hidden, labels, grad_loss)
    real_rows = model.real_local_rows
    return {
        "loss": relative_diff(ours[0], megatrons[0]),
        "loss_shape_equal": ours[0].shape == megatrons[0].shape == (batch, seq),
        "hidden_grad": relative_diff(ours[1], megatrons[1]),
        "weight_grad": relative_diff(ours[2], megatrons[2]),
        "padded_rows_grad_zero": max_over_ranks(ours[2][real_rows:].abs().max().item() if real_rows < ours[2].shape[0] else 0.0) == 0.0,
        "largest_tensor": max_over_ranks(ours[3]),
        "largest_tensor_megatron": max_over_ranks(megatrons[3]),
        "full_logits": seq * batch * model.vocab_size // tp,
        "block_logits": seq * batch * BLOCK_ROWS,
    }


def wrapped_model(tied, sequence_parallel):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_qwen.models.build import build_model

    torch.manual_seed(5)
    model = build_model(tiny_config(tied), sequence_parallel=sequence_parallel)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def model_batches():
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(11)
    tokens, labels = torch.randint(0, VOCAB, (BATCH, SEQ)), torch.randint(0, VOCAB, (BATCH, SEQ))
    padded = dict(input_ids=tokens, position_ids=torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=None, labels=labels)
    cu = torch.tensor([0, 30, 90, SEQ * BATCH], dtype=torch.int32)  # three conversations in one packed row
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=60, max_seqlen_kv=60)
    packed = dict(input_ids=tokens.reshape(1, -1), position_ids=None, attention_mask=None, labels=labels.reshape(1, -1), packed_seq_params=params)
    return {"padded": padded, "packed": packed}


def train_backward(ddp, batch):
    """Per-token loss and every parameter's ``main_grad`` after one backward through megatron's DDP."""
    ddp.zero_grad_buffer()
    loss = ddp(**batch)
    loss.sum().backward()
    ddp.finish_grad_sync()
    return loss.detach(), {name: param.main_grad.clone() for name, param in ddp.module.named_parameters()}


def compare_whole_model(*, tied, sequence_parallel):
    """``GPTModel.forward`` with labels, backward through DDP: ours against megatron's ``_postprocess``."""
    from megatron.core.models.gpt import GPTModel

    from megatron_qwen.models.output_loss import QwenGPTModel

    ddp = wrapped_model(tied, sequence_parallel)
    ddp.module.loss_chunk_bytes = 4 * SEQ * BATCH * BLOCK_ROWS
    output_weight = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    results = {}
    for name, batch in model_batches().items():
        if name == "packed" and sequence_parallel:
            continue  # the packed row goes through the same loss; SP is covered by the padded batch
        ours_loss, ours_grads = train_backward(ddp, batch)
        with mock.patch.object(QwenGPTModel, "_postprocess", GPTModel._postprocess):
            ref_loss, ref_grads = train_backward(ddp, batch)
        results[name] = {
            "loss": relative_diff(ours_loss, ref_loss),
            "loss_shape_equal": ours_loss.shape == ref_loss.shape,
            "grads": max(relative_diff(ours_grads[key], ref_grads[key]) for key in ref_grads),
            "output_weight_grad_scale": max_over_ranks(ref_grads[output_weight].abs().max().item()),
        }
    return results


def main(out_path):
    from megatron.core import parallel_state

    from megatron_qwen.platform import distributed

    tp = int(os.environ.get("WORLD_SIZE", 1))
    distributed.initialize(tensor_parallel=tp, seed=1234)
    modes = [False, True] if tp > 1 else [False]
    results = {"postprocess": {}, "model": {}}
    for sequence_parallel in modes:
        for tied in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                for packed in (False, True):
                    key = f"sp{int(sequence_parallel)}_tied{int(tied)}_{str(dtype)[6:]}_packed{int(packed)}"
                    results["postprocess"][key] = compare_postprocess(
                        tied=tied, dtype=dtype, sequence_parallel=sequence_parallel, packed=packed
                    )
            for name, check in compare_whole_model(tied=tied, sequence_parallel=sequence_parallel).items():
                results["model"][f"sp{int(sequence_parallel)}_tied{int(tied)}_{name}"] = check
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
