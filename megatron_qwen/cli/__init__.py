"""The ``megatron-qwen`` command: one subcommand per tool, each in its own module of this package.

``main`` reads the subcommand and hands the rest of the command line to that module's ``main``; nothing here or in
the modules imports torch or megatron-core before the arguments are parsed, so ``--help`` answers at once. The
scripts in ``tools/`` and ``python -m megatron_qwen.train`` run the same ``main`` functions.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one line of help)
SUBCOMMANDS = {
    "preprocess": ("megatron_qwen.cli.preprocess", "conversations (JSON Lines, Parquet) to a tokenized SFT dataset"),
    "inspect": ("megatron_qwen.cli.inspect_dataset", "a preprocessed conversation with its supervised tokens marked"),
    "convert": ("megatron_qwen.cli.convert", "checkpoints between Hugging Face and megatron-core (hf-to-mcore, "
                                             "mcore-to-hf)"),
    "verify": ("megatron_qwen.cli.verify", "a conversion: logits of transformers and megatron-core compared"),
    "train": ("megatron_qwen.train", "supervised finetuning (one process; under torchrun or srun, one per GPU)"),
    "benchmark": ("megatron_qwen.cli.benchmark", "training throughput against a plain transformers loop"),
    "chat": ("megatron_qwen.cli.chat", "replies from an exported Hugging Face model"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help}" for name, (_, help) in SUBCOMMANDS.items()]
    return ("usage: megatron-qwen SUBCOMMAND [--help] [ARGS ...]\n\n"
            "Supervised finetuning of Qwen chat models on megatron-core.\n\nsubcommands:\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, *rest = argv
    if name not in SUBCOMMANDS:
        print(f"{usage()}megatron-qwen: error: unknown subcommand {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)
