"""The token-weighted loss through megatron-core's real schedule, DDP and finalize_model_grads on 2 ranks.

Usage: torchrun --nproc-per-node 2 training_loss.py OUT_JSON

A global batch of 4 rows with 1, 7, 4 and 2 supervised tokens is split over 2 data-parallel ranks, once as
2 micro-batches of 1 row per rank and once as 1 micro-batch of 2 rows, and once more as 2 micro-batches of 1
row on a copy of the model whose linear layers accumulate their weight gradients straight into ``main_grad``
(megatron's ``gradient_accumulation_fusion`` through ``platform/wgrad_accumulation.py``, float32 here: the
accumulation across micro-batches is what it replaces). For each split, rank 0 records the
loss that ``global_batch_totals`` reports and the gradients megatron leaves in ``main_grad``; every rank also
computes the reference directly: sum of masked per-token losses over all 4 rows / 8, back-propagated on
the unwrapped model without any schedule. Also recorded: the mean of per-micro-batch means (the wrong
number), to show the batch really discriminates the two.
"""
import dataclasses
import json
import sys

import torch

SEQ_LEN = 8
SUPERVISED = [1, 7, 4, 2]


def global_rows(vocab_size):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (len(SUPERVISED), SEQ_LEN + 1), generator=generator)
    loss_mask = torch.zeros(len(SUPERVISED), SEQ_LEN)
    for row, count in enumerate(SUPERVISED):
        loss_mask[row, SEQ_LEN - count :] = 1
    return tokens[:, :-1], tokens[:, 1:], loss_mask


def main(out_path):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform.distributed import initialize
    from megatron_qwen.platform.wgrad_accumulation import provide_wgrad_accumulation
    from megatron_qwen.training.loss import global_batch_totals, make_loss_func, masked_loss_sum, require_per_token_loss

    initialize(seed=5)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=256, num_layers=2)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)

    def wrapped(module):
        model = DistributedDataParallel(module.config, ddp_config, module)
        require_per_token_loss(module.config, ddp_config)
        module.config.finalize_model_grads_func = finalize_model_grads
        module.config.no_sync_func = model.no_sync
        return model

    module = build_model(cfg, calculate_per_token_loss=True)
    model = wrapped(module)
    assert provide_wgrad_accumulation(torch.device("cpu"), torch.float32)
    fused_calls = []  # megatron's linear layers reach the accumulation through its hook for apex's extension
    hook = tensor_parallel.layers.fused_weight_gradient_mlp_cuda
    accumulate = hook.wgrad_gemm_accum_fp32
    hook.wgrad_gemm_accum_fp32 = lambda *args: fused_calls.append(1) or accumulate(*args)
    fused_module = build_model(cfg, calculate_per_token_loss=True, gradient_accumulation_fusion=True)
    fused_module.load_state_dict(module.state_dict())
    fused_model = wrapped(fused_module)

    tokens, labels, loss_mask = global_rows(cfg.vocab_size)
    positions = torch.arange(SEQ_LEN)[None].expand(len(SUPERVISED), -1)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_rank = len(SUPERVISED) // dp_size
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def forward_step(data_iterator, model):
        rows = next(data_iterator)
        output = model(tokens[rows], positions[rows], None, labels=labels[rows])
        return output, make_loss_func(loss_mask[rows])

    def gradients(module=module):
        return {name: param.main_grad.clone() for name, param in module.named_parameters()}

    results = {}
    splits = (
        ("mbs1", model, module, 1), ("mbs2", model, module, 2), ("mbs1_fused_wgrad", fused_model, fused_module, 1)
    )
    for split, run_model, run_module, micro_batch_size in splits:
        run_model.zero_grad_buffer()
        starts = range(mine.start, mine.stop, micro_batch_size)
        micro_batches = [slice(start, start + micro_batch_size) for start in starts]
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[run_model],
            num_microbatches=len(micro_batches),
            seq_length=SEQ_LEN,
            micro_batch_size=micro_batch_size,
        )
        loss_sum, supervised = global_batch_totals(store, parallel_state.get_data_parallel_group())
        results[split] = {"loss": (loss_sum / supervised).item(), "grads": gradients(run_module)}

    # Reference: the definition, on the whole global batch, without megatron's schedule or reductions.
    model.zero_grad_buffer()
    per_token = model(tokens, positions, None, labels=labels)
    loss_sum, num_tokens = masked_loss_sum(per_token, loss_mask)
    (loss_sum / num_tokens).backward()
    reference = {"loss": (loss_sum / num_tokens).item(), "grads": gradients()}
    means = [(per_token[row] * loss_mask[row]).sum().item() / SUPERVISED[row] for row in range(len(SUPERVISED))]

    if torch.distributed.get_rank() == 0:
        summary = {
            "reference_loss": reference["loss"], "mean_of_means": sum(means) / len(means),
            "fused_wgrad_calls": len(fused_calls),
        }
        for split, result in results.items():
            summary[split] = {
                "loss": result["loss"],
                "max_grad_difference": max(
                    (result["grads"][name] - grad).abs().max().item() for name, grad in reference["grads"].items()
                ),
                "max_grad": max(grad.abs().max().item() for grad in reference["grads"].values()),
            }
        with open(out_path, "w") as f:
            json.dump(summary, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
