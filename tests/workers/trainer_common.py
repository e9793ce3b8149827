"""Fixtures shared by the trainer's tests and workers: datasets, a converter-style starting checkpoint, runs.

Datasets are written with megatron-core's IndexedDatasetBuilder in the data tool's layout, with a
``PREFIX_stats.json`` recording the real Qwen tokenizer's sha256 (the trainer checks it). Token ids stay
below ``VOCAB`` so that a small-vocabulary model (``test_model``) trains on them.
The starting checkpoint is iteration 0 of the shared layout, written by ``layout.save_iteration`` exactly
as ``convert_checkpoint.py hf-to-mcore`` writes it (same call, random weights instead of Hugging Face's).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

VOCAB = 1024
SEQ = 32


def test_model():
    from megatron_qwen.models.presets import PRESETS

    # 6 layers: divisible by pipeline sizes 2 and 3, and by 2 stages x 3 virtual chunks
    return dataclasses.replace(PRESETS["tiny"], name="tiny-test", vocab_size=VOCAB, num_layers=6)


def test_moe_model():
    """``tiny-moe`` (Qwen3-MoE: 8 experts, 2 per token; layer 0 sparse, layer 1 dense) with the test vocabulary."""
    from megatron_qwen.models.presets import PRESETS

    return dataclasses.replace(PRESETS["tiny-moe"], name="tiny-moe-test", vocab_size=VOCAB)


def tokenizer():
    from megatron_qwen.data.tokenizer import load_tokenizer

    return load_tokenizer("qwen")


def write_dataset(prefix, conversations, sha, seq_length=SEQ):
    """``conversations``: (tokens, mask) pairs; writes the two indexed datasets and the stats file."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_qwen.data.dataset_files import data_files, file_records

    text = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=np.int32)
    masks = IndexedDatasetBuilder(f"{prefix}_loss_mask_document.bin", dtype=np.uint8)
    for tokens, mask in conversations:
        text.add_document(torch.tensor(tokens), [len(tokens)])
        masks.add_document(torch.tensor(mask), [len(mask)])
    text.finalize(f"{prefix}_text_document.idx")
    masks.finalize(f"{prefix}_loss_mask_document.idx")
    stats = {
        "provenance": {"tokenizer": {"kind": "qwen", "sha256": sha}, "seq_length": seq_length},
        **file_records(data_files(prefix)),  # sizes and digests, as the data tool records them
    }
    Path(f"{prefix}_stats.json").write_text(json.dumps(stats))
    return str(prefix)


def batch_source(prefixes, rows="pad", seq_length=SEQ, seed=1234, global_batch_size=1, micro_batch_size=1,
                 share=(0, 1, 1), **data_settings):
    """A ``BatchSource`` over ``prefixes`` with the run settings given, the others the trainer's defaults but no
    validation split (``data_settings``: further ``DataSettings`` fields, and ``eval_conversations``); ``share``:
    (data-parallel rank, size, row multiple)."""
    from megatron_qwen.batching.source import BatchSource, DataParallelShare
    from megatron_qwen.config import DataSettings, TrainingSettings

    training = TrainingSettings(seed=seed, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                eval_conversations=data_settings.pop("eval_conversations", None))
    data_settings = {"valid_fraction": 0.0, **data_settings}
    data = DataSettings(data_path=list(prefixes), rows=rows, seq_length=seq_length, **data_settings)
    return BatchSource(data, training, DataParallelShare(*share))


def random_conversations(count, seed, lengths=(6, SEQ + 1)):
    """Conversations of random length (in tokens) with a random prompt length: the mask is 0 over the
    prompt and 1 after it, so conversations hold different numbers of supervised tokens."""
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(count):
        length = int(rng.integers(*lengths))
        tokens = rng.integers(1, VOCAB - 1, size=length).tolist()
        prompt = int(rng.integers(1, length - 1))
        conversations.append((tokens, [0] * prompt + [1] * (length - prompt)))
    return conversations


def write_start_checkpoint(root, config=None):
    """Iteration 0 of ``config`` (default: the test model) with random weights (single process)."""
    import torch

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.models.build import build_model
    from megatron_qwen.platform import distributed

    config = config or test_model()
    distributed.initialize(seed=99)
    model = build_model(config, params_dtype=torch.float32)
    layout.save_iteration(root, 0, model.sharded_state_dict(), model_config=config, tokenizer=tokenizer())
    distributed.destroy()


def run_args(data, start, save_dir=None, **settings):
    """Command-line flags of a small fp32 run; ``settings`` are further flags by field name."""
    flags = {
        "data_path": data if isinstance(data, list) else [data],
        "pretrained_checkpoint": start,
        "save_dir": save_dir,
        "precision": "fp32",
        "seq_length": SEQ,
        "rows": "pad",
        "valid_fraction": 0.0,
        "global_batch_size": 8,
        "micro_batch_size": 1,
        "train_steps": 2,
        "warmup_steps": 1,
        "lr": 1e-3,
        "dropout": 0.0,
        "eval_interval": 0,
        "log_interval": 1,
        "save_interval": 1000,
        "pad_token_id": VOCAB - 1,
        **settings,
    }
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def read_records(metrics_file):
    """The per-update records of a run's metrics.jsonl (and validation records), in order."""
    lines = Path(metrics_file).read_text().splitlines()
    return [json.loads(line) for line in lines]


_fixture_dir = None


def fixture_dir(tmp_path_factory, run_python):
    """The directory ``trainer_setup.py`` filled, written once per pytest session."""
    global _fixture_dir
    if _fixture_dir is None:
        directory = tmp_path_factory.mktemp("trainer_fixtures")
        run_python("trainer_setup.py", directory)
        _fixture_dir = directory
    return _fixture_dir


def run_plan(run_torchrun, nproc, plan, work_dir):
    """Runs ``plan`` (see trainer_runs.py) on ``nproc`` processes; returns {run name: how it ended}."""
    plan_path, result_path = Path(work_dir) / "plan.json", Path(work_dir) / "results.json"
    plan_path.write_text(json.dumps(plan))
    run_torchrun("trainer_runs.py", nproc, plan_path, result_path, timeout=600)
    return json.loads(result_path.read_text())


def step_records(save_dir):
    """The per-update records (not the validation ones) of the run that saved into ``save_dir``."""
    return [record for record in read_records(Path(save_dir) / "tensorboard" / "metrics.jsonl") if "loss" in record]


def updates_logged(save_dir) -> int:
    """Updates in the run's metrics.jsonl so far, counting only lines written whole (the trainer may be writing)."""
    metrics = Path(save_dir) / "tensorboard" / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
    return sum("loss" in json.loads(line) for line in lines)
