"""megatron-qwen convert: Qwen checkpoints between Hugging Face and megatron-core.

  hf-to-mcore --hf-dir DIR --mcore-dir OUT [--tokenizer-dir DIR]
      Reads a first-generation Qwen (QWenLMHeadModel), Qwen2/2.5 (Qwen2ForCausalLM), Qwen3
      (Qwen3ForCausalLM), Qwen1.5-MoE/Qwen2-MoE (Qwen2MoeForCausalLM) or Qwen3-MoE (Qwen3MoeForCausalLM)
      checkpoint (safetensors or .bin, single file or indexed shards; experts under their published per-expert
      names or fused as transformers holds them in memory) and writes iteration 0 of the checkpoint layout in
      OUT. The tokenizer files come from --hf-dir unless --tokenizer-dir names another folder.
  mcore-to-hf --mcore-dir DIR --hf-dir OUT [--format qwen2|qwen3|qwen|qwen2_moe|qwen3_moe] [--iteration N]
              [--system-prompt TEXT] [--reasoning-history keep|split] [--skip-verify]
      Writes an iteration (default: the latest) as a Hugging Face model: safetensors shards with an
      index, config.json, the tokenizer files, the ChatML chat template (adding the training data's
      default system prompt, or --system-prompt, to conversations without one, and writing earlier
      replies' reasoning as the training data did, or as --reasoning-history says) and generation_config.json.
      The iteration's files are first checked against its manifest (--skip-verify: not), and weights that are
      not finite (NaN, Inf) are refused.

Runs as a single process on the CPU; check the result with megatron-qwen verify.
"""
from __future__ import annotations

import argparse
import sys

from megatron_qwen.data import reasoning_history
from megatron_qwen.platform.fallbacks import quiet_fallback_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-qwen convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="Hugging Face -> megatron-core (iteration 0)")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--mcore-dir", required=True)
    to_mcore.add_argument("--tokenizer-dir", help="folder with the tokenizer files (default: --hf-dir)")
    to_hf = commands.add_parser("mcore-to-hf", help="megatron-core -> Hugging Face")
    to_hf.add_argument("--mcore-dir", required=True)
    to_hf.add_argument("--hf-dir", required=True)
    # No argparse choices: the layouts' modules import torch, which --help must not wait for (checked in main).
    to_hf.add_argument("--format",
                       help="qwen3: Qwen3ForCausalLM (the default for Qwen3 models); qwen2: Qwen2ForCausalLM (the "
                            "default for Qwen2 and first-generation models); qwen: the first-generation layout (needs "
                            "Qwen's model code); qwen2_moe, qwen3_moe: Qwen2MoeForCausalLM, Qwen3MoeForCausalLM with "
                            "per-expert tensors (the defaults for those models)")
    to_hf.add_argument("--iteration", type=int, help="iteration to export (default: the latest)")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GB)")
    to_hf.add_argument("--system-prompt", help="the chat template's system turn for conversations without one "
                       "('' for none; default: the one the training data was preprocessed with)")
    to_hf.add_argument("--reasoning-history", choices=reasoning_history.POLICIES,
                       help="whether the chat template keeps the reasoning of replies before the last user query "
                            "(default: as the training data was preprocessed)")
    to_hf.add_argument("--skip-verify", action="store_true",
                       help="export without checking the iteration's files against its manifest (sizes, sha256)")
    return parser


def main(argv=None) -> int:
    quiet_fallback_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_qwen.checkpoint.convert import LAYOUTS, hf_to_mcore, mcore_to_hf

    if args.command == "mcore-to-hf" and args.format is not None and args.format not in LAYOUTS:
        parser.error(f"argument --format: invalid choice: {args.format!r} (choose from {', '.join(sorted(LAYOUTS))})")
    try:
        if args.command == "hf-to-mcore":
            written = hf_to_mcore(args.hf_dir, args.mcore_dir, args.tokenizer_dir)
        else:
            written = mcore_to_hf(args.mcore_dir, args.hf_dir, args.format, args.iteration,
                                  int(args.max_shard_gb * 2**30), args.system_prompt, args.reasoning_history,
                                  args.skip_verify)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    sys.exit(main())
