"""A finished run continues to more updates with its optimizer state under ``--override-schedule``, and is refused
without it; each start records itself in SAVE_DIR/run_config.json; the start-up's phases and every log line carry
their times; a run without a save directory, or with a handful of held-out conversations, says so.

The run is the committed one of ``data_fixtures/before_layout`` (4 updates of a cosine schedule with 1 warmup
update, stopped after update 2), resumed in this process; its uninterrupted losses are in its ``expected.json``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from data_fixtures import BEFORE_LAYOUT, fixture_copy
from workers.trainer_common import step_records

from megatron_qwen.config import parse_config
from megatron_qwen.platform import distributed
from megatron_qwen.training.checkpointing import CheckpointError
from megatron_qwen.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trainers resumed and trained in this process

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "


def train(flags: list[str]) -> str:
    trainer = Trainer(parse_config(flags))
    try:
        return trainer.train()
    finally:
        trainer.close()
        distributed.destroy()


def cosine_lr(update: int, updates: int, peak: float = 1e-3, warmup: int = 1) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (updates - warmup)))


def test_a_finished_run_goes_on_to_more_updates_only_with_override_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(fixture_copy(BEFORE_LAYOUT, tmp_path / "run"))
    expected = json.loads(Path("expected.json").read_text())
    flags = expected["flags"]  # --train-steps 4
    # overriding with the run's own schedule changes nothing: updates 3 and 4 of the uninterrupted run, which need
    # the saved Adam moments and schedule position
    assert train(flags + ["--override-schedule"]) == "done"
    for record, reference in zip(step_records("save")[2:], expected["updates"][2:]):
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=0)
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5, abs=0)
    longer = [flag if flag != "4" or flags[index - 1] != "--train-steps" else "6" for index, flag in enumerate(flags)]
    with pytest.raises(CheckpointError, match=r"schedule differs .*updates \(--train-steps, --train-epochs\): "
                                              r"checkpoint 4, now 6\); .*--override-schedule"):
        train(longer)
    distributed.destroy()
    assert train(longer + ["--override-schedule"]) == "done"
    records = step_records("save")
    assert [record["iteration"] for record in records] == [1, 2, 3, 4, 5, 6]
    for record in records[4:]:  # the new schedule from the resumed update on: a cosine decay over 6 updates
        assert record["lr"] == pytest.approx(cosine_lr(record["iteration"], 6), rel=1e-12, abs=1e-15)
    assert records[4]["lr"] != pytest.approx(records[3]["lr"])

    started = json.loads(Path("save/run_config.json").read_text())  # the two starts that trained, not the refused one
    assert [start["iteration"] for start in started["history"]] == [2] and started["iteration"] == 4
    assert started["settings"]["train_steps"] == 6 and started["history"][0]["settings"]["train_steps"] == 4
    assert parse_config(["--recipe", "save/run_config.json"]) == parse_config(longer + ["--override-schedule"])

    out = capsys.readouterr().out.splitlines()
    assert all(re.match(TIME, line) for line in out if not line.startswith(" "))
    phases = [re.sub(TIME, "", line) for line in out if "start-up: " in line]
    assert [re.sub(r" [\d.]+ s$", "", phase) for phase in phases[:7]] == [
        f"start-up: {name}" for name in ("process start to trainer (imports)", "distributed init", "checkpoint verify", "data check", "model build",
                                         "optimizer build", "resume load")]


def test_a_run_without_save_dir_and_with_few_held_out_conversations_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(fixture_copy(BEFORE_LAYOUT, tmp_path / "run"))
    flags = json.loads(Path("expected.json").read_text())["flags"]
    flags = flags[:flags.index("--save-dir")] + flags[flags.index("--save-dir") + 2:]
    few_held_out = ["--valid-fraction", "0.3", "--eval-interval", "1", "--train-steps", "1", "--warmup-steps", "0"]
    assert train(flags + few_held_out) == "done"
    out = capsys.readouterr().out
    assert re.search(r"\n\S+ start: .*; no --save-dir: no checkpoints, no metrics files \(--tensorboard-dir\)\n", out)
    assert re.search(r"warning: --valid-fraction 0.3 holds out \d of 16 conversations: a validation loss on fewer "
                     r"than 10 is noise", out)
