"""megatron-qwen inspect: a preprocessed conversation with its supervised tokens marked, and the dataset's stats.

    megatron-qwen inspect PREFIX [--index I] [--tokenizer TOK] [--ids]

Supervised spans (loss mask 1) are green on a terminal and between [[ ]] otherwise. The tokenizer
defaults to the packaged qwen.tiktoken when the dataset was made with it; its sha256 must match the
dataset's provenance.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_qwen.data.dataset_files import DatasetFilesError
from megatron_qwen.data.inspection import marked_text, open_dataset
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.platform.fallbacks import quiet_fallback_warnings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="the --output-prefix the dataset was written with")
    parser.add_argument("--index", type=int, default=0, help="which conversation to show")
    parser.add_argument("--tokenizer", help="the tokenizer the dataset was made with (default: qwen)")
    parser.add_argument("--ids", action="store_true", help="also print each token id with its mask bit")
    parser.add_argument("--colour", choices=("auto", "always", "never"), default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    quiet_fallback_warnings()
    args = parse_args(argv)
    try:
        tokens, loss_mask, stats = open_dataset(args.prefix)
    except DatasetFilesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    recorded = stats["provenance"]["tokenizer"]
    tokenizer = load_tokenizer(args.tokenizer or "qwen")
    if tokenizer.sha256 != recorded["sha256"]:
        print(f"error: the dataset was made with {recorded['kind']} tokenizer {recorded['vocab_file']} "
              f"(sha256 {recorded['sha256'][:12]}…), not {tokenizer.vocab_file}; pass it with --tokenizer",
              file=sys.stderr)
        return 1
    if not 0 <= args.index < len(tokens):
        print(f"error: --index {args.index} is out of range: the dataset has {len(tokens)} conversations",
              file=sys.stderr)
        return 1
    ids, mask = tokens[args.index], loss_mask[args.index]
    colour = args.colour == "always" or (args.colour == "auto" and sys.stdout.isatty())
    legend = "green" if colour else "between [[ ]]"
    print(f"conversation {args.index} of {len(tokens)}: {len(ids)} tokens, {int(mask.sum())} supervised "
          f"({legend}; loss mask convention '{stats['provenance']['loss_mask']}')")
    print(marked_text(tokenizer, ids, mask, colour))
    if args.ids:
        print(" ".join(f"{i}:{m}" for i, m in zip(ids.tolist(), mask.tolist())))
    print("stats:", json.dumps({k: stats[k] for k in ("conversations", "tokens", "conversation_length",
                                                    "provenance")}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
