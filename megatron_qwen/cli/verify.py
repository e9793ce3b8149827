"""megatron-qwen verify: the same prompts through transformers and megatron-core at a TP/PP layout.

  megatron-qwen verify --hf-dir DIR --mcore-dir DIR [--tp N --pp M] [--ep E [--etp N]] [--iteration N]
                       [--dtype float32|bfloat16] [--layer-impl local|te] [--token-ids FILE] [--skip-verify]

Prints the largest absolute difference of the logits and of the per-token loss over the prompts and
exits 1 when either is above the tolerance (float32: 1e-3 and 1e-3; bfloat16: 0.5 and 0.25; override
with --logits-tolerance / --loss-tolerance). Both models run in --dtype (default float32, whatever
dtype the weights were saved in: the decisive check; bfloat16 is coarse). The prompts are three
ChatML conversations tokenized with the checkpoint's tokenizer (random ids of the same lengths for a model whose
embedding rows cannot hold the tokenizer's ids), or the id lists of --token-ids (a JSON list of lists).
--layer-impl te checks megatron-core's Transformer Engine spec (the default when Transformer Engine imports and a
GPU is visible).

Mixtures of experts also take --ep (expert-parallel size) and --etp (tensor-parallel size inside each expert;
default: --tp). The layout needs PP x lcm(TP, ETP x EP) processes: data parallelism fills TP x PP up to that
number, expert data parallelism fills ETP x EP x PP (--tp 2 --ep 2 runs 4 processes, --ep 2 runs 2).

With more than one process it starts them itself with torchrun (gloo on the CPU, NCCL on GPUs); under torchrun
or SLURM already, it runs as one of the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from megatron_qwen.platform.fallbacks import fallback_note, quiet_fallback_warnings

DTYPES = ("bfloat16", "float32")  # names of torch dtypes (torch is imported once the arguments are parsed)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="the Hugging Face model directory (reference)")
    parser.add_argument("--mcore-dir", required=True, help="the megatron-core checkpoint directory")
    parser.add_argument("--iteration", type=int, help="iteration to check (default: the latest)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixtures of experts)")
    parser.add_argument("--etp", type=int, help="tensor-parallel size inside each expert (default: --tp)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of both models")
    parser.add_argument("--layer-impl", choices=("local", "te"),
                        help="megatron layer spec (default: te when Transformer Engine imports and a GPU is visible)")
    parser.add_argument("--token-ids", help="JSON file with a list of token-id lists to use as prompts")
    parser.add_argument("--logits-tolerance", type=float)
    parser.add_argument("--loss-tolerance", type=float)
    parser.add_argument("--skip-verify", action="store_true",
                        help="load without checking the iteration's files against its manifest (sizes, sha256)")
    return parser.parse_args(argv)


def launched() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def processes(args: argparse.Namespace) -> int:
    from megatron_qwen.platform.distributed import world_size_for

    return world_size_for(args.tp, args.pp, args.ep, args.etp)


def relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs this module under torchrun with the layout's processes; returns its exit status."""
    import torch

    env = {**os.environ}
    # the ranks import the megatron_qwen this process runs: a checkout's (through tools/) is not on their path
    package_root = str(Path(__file__).resolve().parents[2])
    if package_root not in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    # --standalone: torchrun binds its own free port and keeps it (a port found free beforehand may be taken by then)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes(args)), "-m", "megatron_qwen.cli.verify", *argv]
    return subprocess.run(command, env=env).returncode


def checked_iteration(args: argparse.Namespace):
    """(iteration directory, its model configuration), refused when the layout does not fit the model; checked before
    any process is started, so that a bad argument is one line, not one failure per rank and torchrun's report."""
    from megatron_qwen.checkpoint import layout
    from megatron_qwen.config import expert_parallel_problems

    iteration_dir = layout.resolve_iteration(args.mcore_dir, args.iteration)
    saved = layout.load_config(iteration_dir)
    for problem, flag in expert_parallel_problems(saved, args.tp, args.ep, args.etp):
        if problem:
            raise ValueError(f"--{'etp' if flag == 'expert_tensor_parallel' else 'ep'}: {problem}")
    return iteration_dir, saved


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_qwen.checkpoint import manifest, verify
    from megatron_qwen.models.spec import default_layer_impl
    from megatron_qwen.platform import distributed

    iteration_dir, saved = checked_iteration(args)
    dtype = getattr(torch, args.dtype)
    standard = verify.TOLERANCES[dtype]
    tolerance = verify.Tolerance(logits=args.logits_tolerance or standard.logits,
                                 loss=args.loss_tolerance or standard.loss)
    if args.token_ids:
        prompts, source = _read_token_ids(args.token_ids), f"the token ids of {args.token_ids}"
        _check_ids(args.token_ids, prompts, saved.vocab_size)
    else:
        prompts, source = verify.default_prompts(iteration_dir, saved.vocab_size)
    layer_impl = args.layer_impl or default_layer_impl()
    distributed.initialize(tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep,
                           expert_tensor_parallel=args.etp)
    try:
        unverified = None if args.skip_verify else manifest.verify_on_all_ranks(iteration_dir)
        if unverified and torch.distributed.get_rank() == 0:
            print(f"warning: {unverified}", file=sys.stderr)
        cfg, model = verify.load_megatron(iteration_dir, dtype, layer_impl)
        megatron = [verify.megatron_logits(model, cfg, ids) for ids in prompts]
        passed = True
        if verify.holds_output():
            del model
            reference = verify.load_transformers(args.hf_dir, dtype)
            differences = [verify.difference(verify.transformers_logits(reference, ids), logits, ids)
                           for ids, logits in zip(prompts, megatron)]
            passed = _report(args, cfg, dtype, layer_impl, differences, tolerance, source)
        return 0 if _all_ranks_agree(passed) else 1
    finally:
        distributed.destroy()


def _read_token_ids(path: str) -> list[list[int]]:
    with open(path) as stream:
        prompts = json.load(stream)
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and len(p) > 1 for p in prompts)):
        raise SystemExit(f"--token-ids {path}: expected a JSON list of token-id lists (2+ ids each)")
    return prompts


def _check_ids(path: str, prompts: list[list[int]], vocab_size: int) -> None:
    largest = max(max(ids) for ids in prompts)
    if largest >= vocab_size:
        raise SystemExit(f"--token-ids {path}: token id {largest} is outside the model's {vocab_size} embedding rows")


def _report(args, cfg, dtype, layer_impl, differences, tolerance, source) -> bool:
    worst_logits = max(d.logits for d in differences)
    worst_loss = max(d.loss for d in differences)
    tokens = sum(d.tokens for d in differences)
    passed = all(d.within(tolerance) for d in differences)
    experts = f" EP={args.ep} expert-TP={args.etp or args.tp}" if cfg.is_moe else ""
    print(f"verify_conversion: {len(differences)} prompts, {tokens} tokens, TP={args.tp} PP={args.pp}{experts}, "
          f"dtype={str(dtype).removeprefix('torch.')}, layer_impl={layer_impl}; {fallback_note()}")
    print(f"  prompts: {source}")
    print(f"  max |logits difference|         {worst_logits:.3e}  (tolerance {tolerance.logits:.0e})")
    print(f"  max |per-token loss difference| {worst_loss:.3e}  (tolerance {tolerance.loss:.0e})")
    print("  PASS" if passed else "  FAIL: the megatron-core checkpoint does not reproduce the Hugging Face model")
    return passed


def _all_ranks_agree(passed: bool) -> bool:
    """Every rank exits with the output rank's verdict."""
    import torch

    failed = torch.tensor([0 if passed else 1], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(failed)
    return failed.item() == 0


def main(argv=None) -> int:
    quiet_fallback_warnings()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if processes(args) > 1 and not launched():
            checked_iteration(args)
            return relaunch(args, argv)
        return run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"megatron-qwen verify: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # the guard matters: dist-checkpointing re-imports the main module
    sys.exit(main())
