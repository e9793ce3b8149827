"""One Qwen model at several TP/PP layouts on 4 CPU processes: same weights, same logits, same steps.

Usage: torchrun --nproc-per-node 4 parallel_equivalence.py OUT_DIR CHECKPOINT_DIR

The first layout initializes weights from a seed of their own, records their logits on a fixed batch
(saved.pt) and saves them with megatron-core's dist_checkpointing; every layout (the first included)
then builds a model from another seed, loads that checkpoint, records the logits of the same batch
and runs two training steps (megatron DDP, megatron optimizer, the pipeline schedule). Ranks that are data-parallel replicas share the global batch of 4 sequences, so every
layout optimizes the same objective. Results go to OUT_DIR/<layout>.pt, compared by pytest.
"""
import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch

# (tensor parallel, pipeline parallel, virtual pipeline stages, sequence parallel);
# the first one writes the checkpoint
LAYOUTS = [
    (2, 2, None, False),
    (1, 1, None, False),
    (2, 1, None, False),
    (1, 2, None, False),
    (2, 2, None, True),
    (2, 1, None, True),
    (2, 2, 2, False),
]
GLOBAL_BATCH, SEQ_LEN = 4, 32


def layout_name(tp, pp, vp, sp):
    return f"tp{tp}_pp{pp}" + (f"_vp{vp}" if vp else "") + ("_sp" if sp else "")


def qwen_config():
    from megatron_qwen.models.presets import PRESETS

    # tied embeddings exercise the shared word embeddings of the first and last pipeline stages;
    # 1000 rows are padded to 1024, exercising the masked padding at every TP size
    return dataclasses.replace(PRESETS["tiny"], name="tiny-tied-1000", vocab_size=1000, tied_embeddings=True)


def fixed_batch(vocab_size):
    generator = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ_LEN)
    loss_mask[0, :10] = 0  # sequences with different numbers of trained tokens
    loss_mask[2, 5:20] = 0
    return [
        {
            "tokens": tokens[i : i + 1, :-1],
            "labels": tokens[i : i + 1, 1:],
            "positions": torch.arange(SEQ_LEN)[None],
            "loss_mask": loss_mask[i : i + 1],
        }
        for i in range(GLOBAL_BATCH)
    ]


def masked_mean_loss(loss_mask, per_token_loss):
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"loss": loss.detach().clone()}  # the schedule divides ``loss`` in place


def forward_step(cfg, with_labels, data_iterator, model):
    from megatron_qwen.models.build import gather_logits

    batch = next(data_iterator)
    labels = batch["labels"] if with_labels else None
    output = model(batch["tokens"], batch["positions"], None, labels=labels)
    if with_labels:
        return output, partial(masked_mean_loss, batch["loss_mask"])
    return output, lambda logits, non_loss_data=True: gather_logits(logits, cfg)


def build_chunks(cfg, **config_overrides):
    """This rank's model chunks: one, or one per virtual pipeline stage."""
    from megatron.core import parallel_state

    from megatron_qwen.models.build import build_model

    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp is None:
        return [build_model(cfg, **config_overrides)]
    return [build_model(cfg, vp_stage=stage, **config_overrides) for stage in range(vp)]


def sharded_state_dict(chunks):
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def build_and_load(cfg, sequence_parallel, checkpoint_dir):
    from megatron.core import dist_checkpointing

    chunks = build_chunks(cfg, sequence_parallel=sequence_parallel)
    loaded = dist_checkpointing.load(sharded_state_dict(chunks), str(checkpoint_dir))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"])
    return chunks


def data_iterators(chunks, batch):
    # the interleaved schedule takes one iterator per chunk
    return iter(batch) if len(chunks) == 1 else [iter(batch) for _ in chunks]


def record_logits(cfg, chunks, batch):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, cfg, False),
        data_iterator=data_iterators(chunks, batch),
        model=chunks,
        num_microbatches=len(batch),
        seq_length=SEQ_LEN,
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )


def train_steps(cfg, chunks, batch, steps=2):
    """Runs ``steps`` optimizer steps on this rank's share of ``batch``; returns losses and grad norms."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddp_chunks = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk) for chunk in chunks
    ]
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta2=0.95, clip_grad=1.0),
        ddp_chunks,
    )
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = len(batch) // dp_size
    my_batch = batch[dp_rank * share : (dp_rank + 1) * share]
    losses, grad_norms = [], []
    for _ in range(steps):
        for ddp_chunk in ddp_chunks:
            ddp_chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=partial(forward_step, cfg, True),
            data_iterator=data_iterators(chunks, my_batch),
            model=ddp_chunks,
            num_microbatches=share,
            seq_length=SEQ_LEN,
            micro_batch_size=1,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        grad_norms.append(grad_norm)
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([r["loss"] for r in reduced]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(loss.item() / dp_size)
    return losses, grad_norms


def writes_results():
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def save_checkpoint(cfg, batch, out_dir, checkpoint_dir):
    from megatron.core import dist_checkpointing

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)  # weights unlike those every layout starts from before loading
        chunks = build_chunks(cfg)
    logits = record_logits(cfg, chunks, batch)
    if writes_results():
        torch.save({"logits": torch.cat(logits)}, Path(out_dir) / "saved.pt")
    dist_checkpointing.save(sharded_state_dict(chunks), str(checkpoint_dir))
    torch.distributed.barrier()


def run_layout(cfg, tp, pp, vp, sp, out_dir, checkpoint_dir, save_first):
    from megatron.core import parallel_state

    from megatron_qwen.platform import distributed

    distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vp, seed=1234)
    batch = fixed_batch(cfg.vocab_size)
    if save_first:
        save_checkpoint(cfg, batch, out_dir, checkpoint_dir)
    chunks = build_and_load(cfg, sp, checkpoint_dir)
    logits = record_logits(cfg, chunks, batch)
    losses, grad_norms = train_steps(cfg, chunks, batch)
    if writes_results():
        result = {"logits": torch.cat(logits), "losses": losses, "grad_norms": grad_norms}
        torch.save(result, Path(out_dir) / f"{layout_name(tp, pp, vp, sp)}.pt")
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()


def main(out_dir, checkpoint_dir):
    from megatron_qwen.platform import distributed

    cfg = qwen_config()
    for index, layout in enumerate(LAYOUTS):
        run_layout(cfg, *layout, out_dir, checkpoint_dir, save_first=index == 0)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
