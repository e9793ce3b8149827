#!/usr/bin/env python
"""The prepared check of a session with a GPU: the fast path and the cross-device resume, measured in one command.

    bash tools/gpu_check.sh                       # on the GPU machine: installs the carried wheels, then this
    python tools/gpu_check.py OUT [--cpu-dry-run]

Writes ``OUT/gpu_check.json`` (and the benchmarks' own JSON and log); each part records its error instead of
stopping the others:

1. ``kernels``: our packed attention (``SDPAttention``) on one row of several documents at Qwen2.5-1.5B's attention
   shape (12 query heads, 2 key/value groups, head dim 128, 2048 positions), bf16, in training mode with dropout 0.1:
   the SDPA backend torch picks for each call (``torch._fused_sdp_choice`` on the call's own arguments), and the
   median milliseconds per layer, forward and backward, of the current code, of the code before it (3-D
   ``[heads, len, dim]`` calls with repeated keys/values, which run the math kernel) and, without dropout, of
   ``torch.nn.attention.varlen.varlen_attn`` (one call per row).
2. ``benchmark``: ``megatron-qwen benchmark`` for qwen2.5-1.5b on padfree rows, ours against the transformers peer, a
   short run; it counts our row's host synchronisations under CUDA's sync-debug mode.
3. ``resume``: the tiny preset trains 3 updates saving at 2 and 3; the iteration-2 checkpoint is resumed on this
   device and, in a process that sees no GPU, on the CPU; each resume's update 3 against the uninterrupted run's.
4. ``benchmark_moe``: the benchmark of part 2 for a mixture of experts, Qwen3-30B-A3B's layer shape (2 of its 48
   layers), shorter still; last, so that a run past the time limit loses nothing else.

``--cpu-dry-run`` runs parts 1-4 on the CPU at the tiny presets' scale and without dropout (the CPU's fused SDPA
kernel has none), with the kernel fusions a GPU would use (``--kernel-fusions``) and without the second process of
part 3 (the device is already the CPU); the test suite runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# documents of one packed 2048-position row (the benchmark's padfree rows hold ~3-5)
DOCUMENT_LENGTHS = [700, 520, 410, 280, 138]


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def timed_ms(function, repeats: int) -> float:
    """Median milliseconds of ``function()`` (forward and backward) over ``repeats`` calls after two warm-ups."""
    times = []
    for attempt in range(repeats + 2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if attempt >= 2:
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def attention_before(query, key, value, starts, lengths, dropout: float):
    """``SDPAttention``'s packed path as it was: 3-D per-document calls with repeated keys/values."""
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for start, length in zip(starts, lengths):
        q, k, v = (t[start:start + length].transpose(0, 1) for t in (query, key, value))
        k, v = (t.repeat_interleave(groups, dim=0) for t in (k, v))
        pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).transpose(0, 1))
    return torch.cat(pieces).reshape(query.shape[0], -1)


def check_kernels(dry_run: bool) -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, varlen

    from megatron_qwen.models.build import transformer_config
    from megatron_qwen.models.local_modules import SDPAttention
    from megatron_qwen.models.presets import PRESETS

    here = device()
    heads, groups, dim = (4, 2, 16) if dry_run else (12, 2, 128)
    lengths = [6, 10, 3] if dry_run else DOCUMENT_LENGTHS
    dropout = 0.0 if dry_run else 0.1
    dtype = torch.float32 if dry_run else torch.bfloat16
    config = transformer_config(PRESETS["tiny"], attention_dropout=dropout, num_attention_heads=heads,
                                num_query_groups=groups, kv_channels=dim)
    attention = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal).train()
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    q, k, v = (torch.randn(total, n, dim, device=here, dtype=dtype, requires_grad=True) for n in (heads, groups, groups))
    names = {backend.value: name for name, backend in SDPBackend.__members__.items()}
    calls = []
    original = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        calls.append({"backend": names[int(torch._fused_sdp_choice(*args, **kwargs))], "shape": list(args[0].shape)})
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = recorded
    try:
        attention(q, k, v, None, packed_seq_params=params)
    finally:
        F.scaled_dot_product_attention = original

    def backward(output):
        output.float().sum().backward()

    repeats = 3 if dry_run else 20
    starts = cu[:-1].tolist()
    timings = {
        "current": timed_ms(lambda: backward(attention(q, k, v, None, packed_seq_params=params)), repeats),
        "before": timed_ms(lambda: backward(attention_before(q, k, v, starts, lengths, dropout)), repeats),
    }
    if here.type == "cuda":
        def varlen_call():
            out = varlen.varlen_attn(q, k, v, cu.to(here), cu.to(here), max(lengths), max(lengths), enable_gqa=True)
            backward(out)
        try:
            timings["varlen_attn_no_dropout"] = timed_ms(varlen_call, repeats)
        except Exception as error:  # noqa: BLE001 - recorded: whether this torch build runs it is a finding
            timings["varlen_attn_no_dropout"] = f"{type(error).__name__}: {error}"[:300]
    return {"shape": {"heads": heads, "groups": groups, "head_dim": dim, "documents": lengths, "dtype": str(dtype),
                      "dropout": dropout},
            "calls": calls, "ms_per_layer_forward_backward": timings}


DRY_RUN_SIZES = ["--seq-length", "128", "--global-batch-size", "4", "--conversations", "32", "--precision", "fp32",
                 "--steps", "1"]


def check_benchmark(out: Path, dry_run: bool, moe: bool = False) -> dict:
    """The benchmark's padfree rows of a dense model (``OUT/benchmark.json``) or, with ``moe``, of a mixture of
    experts (``OUT/benchmark_moe.json``)."""
    from megatron_qwen.cli import benchmark

    if dry_run:
        sizes = ["--preset", "tiny-moe", "--num-layers", "1"] if moe else ["--preset", "tiny"]
        sizes += DRY_RUN_SIZES
    elif moe:  # 1.87B parameters: 34 GB of weights, gradients and Adam state in ours, 15 GB in the peer
        sizes = ["--preset", "qwen3-30b-a3b", "--num-layers", "2", "--global-batch-size", "8", "--conversations",
                 "200", "--steps", "2"]
    else:
        sizes = ["--preset", "qwen2.5-1.5b", "--global-batch-size", "16", "--conversations", "400", "--steps", "3"]
    report_file = out / ("benchmark_moe.json" if moe else "benchmark.json")
    status = benchmark.main([*sizes, "--rows", "padfree", "--warmup", "1", "--json", str(report_file)])
    report = json.loads(report_file.read_text())
    run = report["runs"][0]
    return {"status": status, "device": report["device"], "preset": run["preset"], "num_layers": run["num_layers"],
            "ours_over_peer_tokens_per_s": run["ours_over_peer_tokens_per_s"], "rows": run["rows"],
            "ours_host_syncs": run["ours_host_syncs"]}


def trainer_flags(data_prefix: str, save_dir: Path, steps: int, dry_run: bool) -> list[str]:
    return ["--preset", "tiny", "--data-path", data_prefix, "--tokenizer", "qwen", "--seq-length", "128",
            "--global-batch-size", "4", "--train-steps", str(steps), "--warmup-steps", "1", "--lr", "1e-3",
            "--valid-fraction", "0", "--eval-interval", "0", "--save-dir", str(save_dir), "--save-interval", "2",
            "--dropout", "0.0" if dry_run else "0.1", "--tensorboard-dir", str(save_dir / "tensorboard"),
            *(["--precision", "fp32", "--kernel-fusions"] if dry_run else [])]


def train(flags: list[str]) -> list[float]:
    """Runs the trainer in this process; returns the losses it recorded."""
    from megatron.core import parallel_state

    from megatron_qwen.config import parse_config
    from megatron_qwen.training.trainer import Trainer

    config = parse_config(flags)
    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
        parallel_state.destroy_model_parallel()
    records = Path(config.training.tensorboard_dir) / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in records.read_text().splitlines() if '"loss"' in line]


def resume_copy(full: Path, target: Path) -> Path:
    """``full``'s checkpoint directory as it was after iteration 2 (iteration 3 and its metrics dropped)."""
    shutil.copytree(full, target, ignore=shutil.ignore_patterns("iter_0000003", "tensorboard"))
    (target / "latest").write_text("2\n")
    return target


def check_resume(out: Path, work: Path, dry_run: bool) -> dict:
    from megatron_qwen.training.benchmark import write_dataset

    args = argparse.Namespace(seed=1, median_length=40, seq_length=128, conversations=64, tokenizer="qwen")
    prefix, _ = write_dataset(work, args)
    full = work / "full"
    losses = train(trainer_flags(prefix, full, 3, dry_run))
    here = train(trainer_flags(prefix, resume_copy(full, work / "here"), 3, dry_run))
    found = {"uninterrupted": losses, "resumed_on_this_device": here}
    if not dry_run:
        cpu_dir = resume_copy(full, work / "cpu")
        command = [sys.executable, __file__, str(out), "--resume-on-cpu", prefix, str(cpu_dir)]
        result = subprocess.run(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                                text=True, timeout=240)
        (out / "resume_on_cpu.log").write_text(result.stdout + result.stderr)
        start_line = next((line for line in result.stdout.splitlines() if line.startswith("start:")), None)
        found["resumed_on_the_cpu"] = {"status": result.returncode, "start_line": start_line,
                                       "losses": json.loads((out / "resume_on_cpu.json").read_text())
                                       if result.returncode == 0 else None}
    return found


def resume_on_cpu(out: Path, prefix: str, save_dir: Path) -> None:
    losses = train(trainer_flags(prefix, save_dir, 3, dry_run=False))
    (out / "resume_on_cpu.json").write_text(json.dumps(losses))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for the results")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the CPU's share, at the tiny preset's scale")
    parser.add_argument("--resume-on-cpu", nargs=2, metavar=("PREFIX", "SAVE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume_on_cpu:
        resume_on_cpu(out, args.resume_on_cpu[0], Path(args.resume_on_cpu[1]))
        return 0
    from megatron_qwen.platform import distributed

    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "dry_run": args.cpu_dry_run}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        parts = {
            "kernels": lambda: check_kernels(args.cpu_dry_run),
            "benchmark": lambda: check_benchmark(out, args.cpu_dry_run),
            "resume": lambda: check_resume(out, Path(work), args.cpu_dry_run),
            "benchmark_moe": lambda: check_benchmark(out, args.cpu_dry_run, moe=True),
        }
        for name, part in parts.items():
            started = time.perf_counter()
            try:
                if name == "kernels":
                    distributed.initialize(seed=1)
                results[name] = part()
            except Exception:  # noqa: BLE001 - each part's failure is a finding; the others still run
                results[name] = {"error": traceback.format_exc()[-3000:]}
            finally:
                if name == "kernels":
                    distributed.destroy()
            results[name + "_seconds"] = round(time.perf_counter() - started, 1)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
            print(f"gpu_check: {name} done in {results[name + '_seconds']} s", flush=True)
    failed = [name for name in parts if "error" in results[name]]
    print(f"gpu_check: results in {out / 'gpu_check.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    sys.exit(main())
