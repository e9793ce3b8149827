"""Runs several trainer configurations one after another in one torchrun launch (CPU, gloo).

Usage: torchrun --nproc-per-node N trainer_runs.py PLAN_JSON RESULT_JSON

PLAN_JSON is a list of runs: ``{"name", "flags": [...], "env": {VAR: value}, "copy": [FROM, TO]}`` (``copy``,
optional: a directory copied before the run, e.g. another run's save directory to resume). Each run builds a fresh
``Trainer`` from the flags (megatron's parallel groups are rebuilt, the process group is kept) and records
on rank 0 how it ended: ``"done"``, the signal's name, or the error's class and message; how many objects
the garbage collector had frozen once the trainer was built and after it closed, and whether a reference cycle
left unreachable just before the start-up (automatic collection paused meanwhile) was freed by then. Metrics
come from the runs' own metrics.jsonl files, which the test reads.
"""
import gc
import json
import os
import shutil
import sys
import weakref


class Garbage:
    pass


def unreachable_cycle() -> weakref.ref:
    cycle = Garbage()
    cycle.itself = cycle
    return weakref.ref(cycle)


def build_watched(trainer_class, config):
    """The trainer, and whether a cycle left unreachable just before its start-up was freed by its end (automatic
    collection paused meanwhile, so that only the trainer's own collection can free it)."""
    garbage = unreachable_cycle()
    gc.disable()
    try:
        trainer = trainer_class(config)
    finally:
        gc.enable()
    return trainer, garbage() is None


def run(flags, env):
    from megatron.core import parallel_state

    from megatron_qwen.config import parse_config
    from megatron_qwen.training.trainer import Trainer

    os.environ.update({name: str(value) for name, value in env.items()})
    trainer, result = None, {}
    try:
        trainer, result["start_up_garbage_freed"] = build_watched(Trainer, parse_config(flags))
        result["frozen_while_training"] = gc.get_freeze_count()
        result["ended"] = trainer.train()
    except Exception as error:  # recorded for the test to check
        result.update(ended=type(error).__name__, message=str(error))
    finally:
        for name in env:
            os.environ.pop(name, None)
        if trainer is not None:
            trainer.close()
            result["frozen_after_close"] = gc.get_freeze_count()
        parallel_state.destroy_model_parallel()
    return result


def main(plan_path, result_path):
    import torch

    with open(plan_path) as f:
        plan = json.load(f)
    results = {}
    for entry in plan:
        if "copy" in entry:
            if torch.distributed.get_rank() == 0:
                shutil.copytree(*entry["copy"])
            torch.distributed.barrier()
        results[entry["name"]] = run(entry["flags"], entry.get("env", {}))
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
