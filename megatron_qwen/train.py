"""Supervised finetuning of a Qwen model on megatron-core: ``megatron-qwen train`` (``python -m megatron_qwen.train``).

    megatron-qwen train [--recipe NAME|FILE] [--flag value ...]                     # one process
    torchrun --no-python --nproc-per-node 8 megatron-qwen train --recipe qwen_14b_sft ...
    srun megatron-qwen train ...                                                    # under SLURM (one task per GPU)

``--help`` lists every setting (megatron_qwen/config.py); a recipe file sets many at once and flags override it.
``--recipe NAME`` names one of the recipes shipped in megatron_qwen/recipes/ (NAME.json).
Exit status: 0 when the run finished or stopped on SIGTERM/SIGUSR1 (after saving; a signal during start-up
stops it before any update, with nothing new to save); 2 for a configuration, dataset or checkpoint that
cannot be used; 3 when the loss or gradient norm stopped being finite; 4 when a checkpoint could not be written
(a full disk: the ones saved before are intact).
"""
from __future__ import annotations

import sys

from megatron_qwen.platform.fallbacks import quiet_fallback_warnings
from megatron_qwen.training.interrupts import StopRequest



def _failures() -> tuple:
    """Exit status, and the message's first word, by the kind of failure."""
    from megatron_qwen.checkpoint.layout import CheckpointSaveError
    from megatron_qwen.data.tokenizer import TokenizerError
    from megatron_qwen.training.checkpointing import CheckpointError
    from megatron_qwen.batching.checks import DatasetMismatchError
    from megatron_qwen.training.trainer import TrainingDiverged

    return (
        ((CheckpointError, DatasetMismatchError, TokenizerError, FileNotFoundError, ValueError), 2, "error"),
        ((TrainingDiverged,), 3, "diverged"),
        ((CheckpointSaveError,), 4, "error"),
    )


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def main(argv: list[str] | None = None, prog: str = "megatron-qwen train") -> int:
    # Before anything else: torch and megatron-core take seconds to import, on every rank at once, and a preemption
    # signal meanwhile would kill a process that a requeueing launcher then takes for a failure. Recorded, it stops
    # the run at the end of its start-up.
    stop = StopRequest()
    quiet_fallback_warnings()
    from megatron_qwen.config import parse_config

    try:
        config = parse_config(sys.argv[1:] if argv is None else argv, prog)
    except ValueError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    # torch and megatron-core only now: --help and a bad flag answer at once
    from megatron_qwen.platform import distributed
    from megatron_qwen.training.trainer import Trainer

    failures = _failures()
    trainer = None
    try:
        trainer = Trainer(config, stop)
        stopped = trainer.train()
        if stopped != "done":
            trainer.reporter.print(trainer.stop_message(stopped))
        return 0
    except tuple(kind for kinds, _, _ in failures for kind in kinds) as error:
        status, word = next((status, word) for kinds, status, word in failures if isinstance(error, kinds))
        print(f"train: {word} (rank {_rank()}): {error}", file=sys.stderr, flush=True)
        return status
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy()


if __name__ == "__main__":  # processes that multiprocessing spawns re-import the main module
    sys.exit(main(prog="python -m megatron_qwen.train"))
