"""Packed and padded micro-batches of a BatchSource through the tiny Qwen model and megatron's schedule.

Usage: torchrun --nproc-per-node 1 training_packed_model.py DATA_PREFIX OUT_JSON

The same conversations (the first rows of the packed stream, and as many padded rows as they hold) go
through ``get_forward_backward_func`` with the shapes ``BatchSource.shape`` gives, packed as THD micro-batches
of 2 rows, padded as ``[2, seq]`` micro-batches. Writes both token-weighted losses and the conversations
each covered.
"""
import dataclasses
import json
import sys

import torch

SEQ, PACKED_ROWS, MICRO_BATCH = 32, 4, 2


def global_loss(samples, rows, model):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen.training.loss import global_batch_totals, make_loss_func

    micro_batches = samples.rank_micro_batches(rows)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(
            batch.tokens, batch.position_ids, None, labels=batch.labels, packed_seq_params=batch.packed_seq_params()
        )
        return output, make_loss_func(batch.loss_mask)

    store = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=samples.shape.seq_length,
        micro_batch_size=samples.shape.micro_batch_size,
        forward_only=True,
    )
    loss_sum, supervised = global_batch_totals(store)
    return (loss_sum / supervised).item()


def main(prefix, out_path):
    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform.distributed import initialize
    from trainer_common import batch_source

    initialize(seed=3)
    model = build_model(dataclasses.replace(PRESETS["tiny"], vocab_size=256), calculate_per_token_loss=True)
    model.eval()
    packed = batch_source([prefix], rows="pack", seq_length=SEQ, seed=1, pad_token_id=0, micro_batch_size=MICRO_BATCH)
    packed_rows = packed.next_rows(PACKED_ROWS)
    conversations = [item for row in packed_rows for item in row]
    padded = batch_source([prefix], rows="pad", seq_length=SEQ, seed=1, pad_token_id=0, micro_batch_size=MICRO_BATCH)
    padded_rows = padded.next_rows(len(conversations))  # pad mode: one conversation per row
    if len(padded_rows) % MICRO_BATCH:
        padded_rows.append(())  # an all-padding row: no supervised token, the loss is unchanged
    with torch.no_grad():
        result = {
            "packed": global_loss(packed, packed_rows, model),
            "padded": global_loss(padded, padded_rows, model),
            "packed_conversations": [list(item) for item in conversations],
            "padded_conversations": [list(item) for row in padded_rows for item in row],
        }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
