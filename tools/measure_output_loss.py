#!/usr/bin/env python
"""Peak memory and time of one micro-batch's output layer + loss, forward and backward: megatron's path or ours.

    python tools/measure_output_loss.py {megatron,ours} {measure-float32,count-bfloat16}

Shape: Qwen2.5-1.5B's output layer (tied, 151,936 rows, hidden 1536), 2048 positions, one process (TP1).
``megatron`` is ``GPTModel._postprocess`` (``output_layer`` + ``vocab_parallel_cross_entropy``), ``ours`` the
blockwise ``QwenGPTModel._postprocess`` (``models/output_loss.py``).

- ``measure-float32``: a real float32 run; the resident-set high-water mark above the resident set before the
  loss, and the seconds forward + backward took.
- ``count-bfloat16``: the bf16 run under ``FakeTensorMode`` (no arithmetic, so it runs on CPUs without bf16
  matrix units); the peak bytes of live tensors by torch's ``MemTracker``, what ``torch.cuda.max_memory_allocated``
  would count on a GPU.
"""
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POSITIONS = 2048


def setup(dtype):
    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.presets import PRESETS
    cfg = dataclasses.replace(PRESETS["qwen2.5-1.5b"], num_layers=1)  # tied, vocab 151936, hidden 1536
    model = build_model(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16, perform_initialization=False)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    hidden = torch.randn(POSITIONS, 1, cfg.hidden_size, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, POSITIONS))
    return model, hidden, labels


def loss_step(path, model, hidden, labels):
    from megatron.core.models.gpt import GPTModel

    postprocess = GPTModel._postprocess if path == "megatron" else type(model)._postprocess
    none = dict(input_ids=None, position_ids=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None)
    loss = postprocess(model, hidden_states=hidden, labels=labels, **none)
    loss.sum().backward()


def main(path, mode):
    from megatron_qwen.platform import distributed

    distributed.initialize()
    if mode == "measure-float32":
        model, hidden, labels = setup(torch.float32)
        loss_step(path, model, hidden[:16], labels[:, :16])  # warm-up on 16 positions
        model.output_weight().grad = None
        before = psutil.Process().memory_info().rss
        start = time.perf_counter()
        loss_step(path, model, hidden, labels)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"peak_above_start_MiB": (peak - before) / 2**20, "seconds": seconds}
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker

        with FakeTensorMode():
            model, hidden, labels = setup(torch.bfloat16)
            tracker = MemTracker()
            with tracker:
                loss_step(path, model, hidden, labels)
            peak = sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())
            weight = model.output_weight()
            result = {"peak_above_weight_MiB": (peak - weight.numel() * weight.element_size()) / 2**20}
    print(json.dumps({"path": path, "mode": mode, **result}))


if __name__ == "__main__":
    main(*sys.argv[1:])
