"""What the trainer reports, read back from the files it writes: metrics.jsonl, TensorBoard's event files and
Weights & Biases' offline run files; and its log lines, each starting with the time.

A resume from an earlier checkpoint than the last update logged (a killed run) does those updates again: their
first records are dropped, so that each update has one. The numbers are made up and the expected values worked out by hand: the held-out loss of blended datasets is the
supervised-token-weighted mean of their parts, and each blended dataset's epochs get a TensorBoard tag of its name.
"""
import dataclasses
import importlib.util
import json
import re
import struct
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_qwen.config import RunConfig
from megatron_qwen.models.presets import PRESETS
from megatron_qwen.training.metrics import Reporter
from megatron_qwen.training.step import StepResult


TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "  # local time with its UTC offset


def reporter(tmp_path, dataset_names, train_steps=10, resumed_at=None, log_interval=1, **training):
    config = RunConfig()
    config.data.data_path, config.data.seq_length = [f"/data/{name}" for name in dataset_names], 32
    config.training.log_interval, config.training.tensorboard_dir = log_interval, str(tmp_path)
    for name, value in training.items():
        setattr(config.training, name, value)
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
    assert all(re.match(TIME, line) for line in printed)
    printed = [line.split(" ", 1)[1] for line in printed]
    assert printed[0].startswith("iteration 1 | epoch 0.250/0.750 | loss 2.000000 |")
    assert printed[0].endswith(" | remaining 1:00:00")  # 9 more updates of 400 s
    assert printed[1] == ("iteration 1 | validation loss 1.250000 | validation loss held-out/chat 1.000000 | "
                          "validation loss held-out/code 2.000000 | validation loss eval_math 3.000000")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["epochs"] == [0.25, 0.75]
    assert records[1] == {"iteration": 1, "validation_loss": 1.25, "validation_loss/held-out/chat": 1.0,
                          "validation_loss/held-out/code": 2.0, "validation_loss/eval_math": 3.0}
    tags = scalars(tmp_path)
    assert tags["train/epoch/chat"] == [(1, 0.25)] and tags["train/epoch/code"] == [(1, 0.75)]
    assert tags["validation/loss"] == [(1, 1.25)] and tags["validation/loss/eval_math"] == [(1, 3.0)]


def test_a_single_dataset_reports_one_epoch_and_one_held_out_loss(tmp_path):
    report = reporter(tmp_path, ["chat"])
    result = StepResult(loss=2.0, grad_norm=1.5, lr=1e-5, skipped=False, tokens=100, supervised_tokens=40,
                        conversations=4, rows=2)
    report.step(3, result, 0.5, [1.5])
    report.validation(3, {"held-out": (1.5, 12)}, ["held-out"])
    report.close()
    tags = scalars(tmp_path)
    assert tags["train/epoch"] == [(3, 1.5)] and tags["validation/loss"] == [(3, 1.5)]
    assert not any(tag.startswith("validation/loss/") for tag in tags)
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
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4]  # TensorBoard's steps 3 purged too


def results(*losses):
    return [StepResult(loss=loss, grad_norm=1.0 + index, lr=1e-5 * (index + 1), skipped=False, tokens=100,
                       supervised_tokens=40, conversations=4, rows=2) for index, loss in enumerate(losses)]


def test_log_records_and_tags_name_the_update_and_the_interval_mean_apart(tmp_path, capsys):
    report = reporter(tmp_path, ["chat"], log_interval=2)
    for iteration, result in enumerate(results(2.0, 3.0, 4.0, 8.0), start=1):
        report.step(iteration, result, 0.5, [0.1 * iteration])
    report.close()
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    # one line per 2 updates: their mean loss, the last one's gradient norm and learning rate
    assert [line.split(" | ")[2:5] for line in lines] == [
        ["mean loss 2.500000", "lr 2.0000e-05", "grad norm 2.0000"], ["mean loss 6.000000", "lr 4.0000e-05",
                                                                     "grad norm 4.0000"]]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["loss"] for record in records] == [2.0, 3.0, 4.0, 8.0]
    tags = scalars(tmp_path)
    assert tags["train/loss"] == [(1, 2.0), (2, 3.0), (3, 4.0), (4, 8.0)]  # each update's, as in metrics.jsonl
    assert [step for step, _ in tags["train/grad_norm"]] == [1, 2, 3, 4]
    assert [step for step, _ in tags["throughput/tokens_per_s_per_gpu"]] == [2, 4]  # per log interval
    assert tags["throughput/tokens_per_s_per_gpu"][0][1] == pytest.approx(200)  # 2 x 100 tokens in 2 x 0.5 s
    assert {"batch/supervised_tokens", "throughput/mfu", "memory/peak_gib", "train/lr"} <= set(tags)
    assert not [tag for tag in tags if "/" not in tag]  # every tag in a group


def wandb_records(run_file):
    """The records of a W&B run file (``run-ID.wandb``: LevelDB's log format, 32 KiB blocks of records with a 7-byte
    header each, after a 7-byte file header), parsed with W&B's own protocol buffers."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, block = run_file.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        if position + 7 + length > len(data):  # being written
            return
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture
def fresh_wandb():
    """W&B keeps the settings it read first in a process (the environment's mode among them) until torn down."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def finished_wandb_records(run_file, patience_s=60.0):
    """The records of a finished W&B run, once its writer (W&B's service process, which goes on after ``finish()``
    returns) has written the run's ``exit`` record."""
    deadline = time.monotonic() + patience_s
    while True:
        records = list(wandb_records(run_file))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {patience_s} s"
        time.sleep(0.1)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_the_figures_and_the_settings(tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = reporter(tmp_path, ["chat"], wandb_project="sft-test")
    for iteration, result in enumerate(results(2.0, 3.0), start=1):
        report.step(iteration, result, 0.5, [0.1 * iteration])
    report.validation(2, {"held-out": (1.5, 12)}, ["held-out"])
    report.close()
    [run_file] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged, settings = {}, {}
    for record in finished_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged.setdefault(items["_step"], {}).update(items)
        if record.WhichOneof("record_type") == "run":
            settings = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert (logged[1]["train/loss"], logged[2]["train/loss"], logged[2]["validation/loss"]) == (2.0, 3.0, 1.5)
    assert logged[2]["throughput/tokens_per_s_per_gpu"] == pytest.approx(200)
    assert settings["wandb_project"] == "sft-test" and settings["data_path"] == ["/data/chat"]
    assert settings["lr"] == RunConfig().optimizer.lr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_a_wandb_run_that_cannot_start_is_a_problem_named_by_the_flag(tmp_path, monkeypatch, fresh_wandb):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no stored login either
    report = reporter(tmp_path, ["chat"], wandb_project="sft-test")
    report.close()
    assert report.wandb is None and report.problem.startswith("--wandb-project sft-test: W&B did not start (")
