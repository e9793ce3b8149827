"""What the trainer reports, read back from the files it writes: metrics.jsonl and TensorBoard's event files.

A resume from an earlier checkpoint than the last update logged (a killed run) does those updates again: their
first records are dropped, so that each update has one. The numbers are made up and the expected values worked out by hand: the held-out loss of blended datasets is the
supervised-token-weighted mean of their parts, and each blended dataset's epochs get a TensorBoard tag of its name.
"""
import dataclasses
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_qwen.config import RunConfig
from megatron_qwen.models.presets import PRESETS
from megatron_qwen.training.metrics import Reporter
from megatron_qwen.training.step import StepResult


def reporter(tmp_path, dataset_names, train_steps=10, resumed_at=None):
    config = RunConfig()
    config.data.data_path, config.data.seq_length = [f"/data/{name}" for name in dataset_names], 32
    config.training.log_interval, config.training.tensorboard_dir = 1, str(tmp_path)
    return Reporter(PRESETS["tiny"], config, world_size=1, writes=True, train_steps=train_steps, resumed_at=resumed_at)


def scalars(tmp_path):
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_blended_runs_report_each_datasets_epochs_and_held_out_loss(tmp_path, capsys):
    report = reporter(tmp_path, ["chat", "code"])
    result = StepResult(loss=2.0, grad_norm=1.5, lr=1e-5, skipped=False, tokens=100, supervised_tokens=40,
                        conversations=4, rows=2)
    report.step(1, result, 400.0, [0.25, 0.75])
    # held-out parts: 1.0 over 30 tokens and 2.0 over 10: (30 + 20) / 40 = 1.25
    results = {"held-out/chat": (1.0, 30), "held-out/code": (2.0, 10), "eval_math": (3.0, 7)}
    report.validation(1, results, ["held-out/chat", "held-out/code"])
    report.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("iteration 1 | epoch 0.250/0.750 | loss 2.000000 |")
    assert printed[0].endswith(" | remaining 1:00:00")  # 9 more updates of 400 s
    assert printed[1] == ("iteration 1 | validation loss 1.250000 | validation loss held-out/chat 1.000000 | "
                          "validation loss held-out/code 2.000000 | validation loss eval_math 3.000000")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["epochs"] == [0.25, 0.75]
    assert records[1] == {"iteration": 1, "validation_loss": 1.25, "validation_loss/held-out/chat": 1.0,
                          "validation_loss/held-out/code": 2.0, "validation_loss/eval_math": 3.0}
    tags = scalars(tmp_path)
    assert tags["epoch/chat"] == [(1, 0.25)] and tags["epoch/code"] == [(1, 0.75)]
    assert tags["validation_loss"] == [(1, 1.25)] and tags["validation_loss/eval_math"] == [(1, 3.0)]


def test_a_single_dataset_reports_one_epoch_and_one_held_out_loss(tmp_path):
    report = reporter(tmp_path, ["chat"])
    result = StepResult(loss=2.0, grad_norm=1.5, lr=1e-5, skipped=False, tokens=100, supervised_tokens=40,
                        conversations=4, rows=2)
    report.step(3, result, 0.5, [1.5])
    report.validation(3, {"held-out": (1.5, 12)}, ["held-out"])
    report.close()
    tags = scalars(tmp_path)
    assert tags["epoch"] == [(3, 1.5)] and tags["validation_loss"] == [(3, 1.5)]
    assert not any(tag.startswith("validation_loss/") for tag in tags)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]) == pytest.approx(
        {"iteration": 3, "validation_loss": 1.5})


def test_a_resume_drops_the_records_of_the_updates_it_does_again(tmp_path):
    result = StepResult(loss=2.0, grad_norm=1.5, lr=1e-5, skipped=False, tokens=100, supervised_tokens=40,
                        conversations=4, rows=2)
    first = reporter(tmp_path, ["chat"])
    for iteration in (1, 2, 3):
        first.step(iteration, result, 1.0, [0.1])
    first.validation(2, {"held-out": (1.0, 30)}, ["held-out"])
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as records:
        records.write('{"iteration": 4, "lo')  # killed while writing
    resumed = reporter(tmp_path, ["chat"], resumed_at=2)
    for iteration in (3, 4):
        resumed.step(iteration, dataclasses.replace(result, loss=3.0), 1.0, [0.2])
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(record["iteration"], record.get("loss")) for record in records] == [
        (1, 2.0), (2, 2.0), (2, None), (3, 3.0), (4, 3.0)
    ]
    assert [step for step, _ in scalars(tmp_path)["loss"]] == [1, 2, 3, 4]  # TensorBoard's steps 3 purged too
