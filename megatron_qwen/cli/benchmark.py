"""megatron-qwen benchmark: training throughput of the SFT trainer against a plain transformers loop, same batches.

    megatron-qwen benchmark [--preset qwen2.5-1.5b qwen-1.8b] [--rows pad pack padfree] [--steps 10] [--warmup 3]
                            [--global-batch-size 32] [--micro-batch-size 1] [--peer-compile] [TRAINER FLAGS]
    megatron-qwen benchmark --preset qwen3-30b-a3b --num-layers 4 --rows padfree   # a mixture of experts, one GPU
    torchrun --no-python --nproc-per-node 8 megatron-qwen benchmark ...     # several GPUs: data parallelism

Flags this command does not know go to the trainer's configuration (e.g. --recompute selective). What each row
runs and what is reported: megatron_qwen/training/benchmark.py and docs/performance.md.
"""
from __future__ import annotations

import argparse
import sys

from megatron_qwen.models.presets import PRESETS
from megatron_qwen.platform.fallbacks import quiet_fallback_warnings
from megatron_qwen.training import flops

DEFAULT_PRESETS = ["qwen2.5-1.5b", "qwen-1.8b"]


def parse_args(argv=None):
    # no abbreviations: a trainer flag must never be taken for a prefix of one of ours
    parser = argparse.ArgumentParser(prog="megatron-qwen benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", nargs="+", default=DEFAULT_PRESETS, choices=sorted(PRESETS))
    parser.add_argument("--rows", nargs="+", choices=("pad", "pack", "padfree"), default=["pad"],
                        help="data regimes, each measured for both rows (in one process: one start-up, one matmul "
                             "rate)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="layers of each preset (default: its own): a large model's layer shape in one GPU's "
                             "memory (both rows)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=32,
                        help="rows per update (both rows); conversations with --rows padfree")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch (both rows)")
    parser.add_argument("--steps", type=int, default=10, help="timed updates per row, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="updates per row before timing")
    parser.add_argument("--dropout", type=float, default=0.1, help="attention and hidden dropout (both rows)")
    parser.add_argument("--peak-tflops", type=float, default=flops.H100_SXM_BF16_DENSE_PEAK / 1e12,
                        help="the device's dense bf16 peak for MFU (default: H100 SXM)")
    parser.add_argument("--peer-compile", action="store_true", help="add a row: the peer under torch.compile")
    parser.add_argument("--tokenizer", default="qwen", help="tokenizer of the synthetic dataset (see docs/data.md)")
    parser.add_argument("--conversations", type=int, default=2000, help="synthetic conversations to write")
    parser.add_argument("--median-length", type=int, default=None,
                        help="median conversation length in tokens (default: 0.3 x --seq-length)")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n x n x n bf16 product "
                        "(default: 8192 on a GPU, 256 on the CPU)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--profile", help="directory for a torch.profiler table per row (operators by device "
                        "time; keep --steps, --warmup and --global-batch-size small with it)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args, trainer_flags = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.num_layers is not None and args.num_layers < 1:
        parser.error(f"--num-layers must be at least 1, got {args.num_layers}")
    return args, trainer_flags


def main(argv=None) -> int:
    quiet_fallback_warnings()
    args, trainer_flags = parse_args(argv)
    from megatron_qwen.training.benchmark import run

    return run(args, trainer_flags)


if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    sys.exit(main())
