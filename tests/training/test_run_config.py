"""SAVE_DIR/run_config.json: the resolved settings of each start, which ``--recipe`` takes back, with versions, the
command line and the earlier starts."""
import json
import sys

import pytest

from megatron_qwen.config import parse_config
from megatron_qwen.training import run_config

FLAGS = ["--data-path", "0.25", "data/chat", "0.75", "data/code", "--preset", "tiny", "--train-iters", "40",
         "--warmup-fraction", "0.1", "--rows", "pack", "--valid-data-path", "data/eval", "--no-distributed-optimizer"]


def test_the_settings_written_come_back_through_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lr": 3e-5, "seq_length": 512, "tensorboard_dir": "tb"}))
    original = parse_config(["--recipe", str(recipe), *FLAGS, "--save-dir", str(tmp_path / "run")])
    monkeypatch.setattr(sys, "argv", ["train.py", "--recipe", str(recipe), *FLAGS])
    (tmp_path / "run").mkdir()
    assert run_config.write(tmp_path / "run", run_config.start_record(original, "random weights", 0, 8)) is None
    written = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert written["command_line"] == ["train.py", "--recipe", str(recipe), *FLAGS]
    assert written["versions"]["torch"] and written["versions"]["megatron-core"] == "0.16.1"
    assert written["world_size"] == 8 and written["history"] == []
    assert written["settings"]["lr"] == 3e-5 and written["settings"]["data_weights"] == [0.25, 0.75]
    assert parse_config(["--recipe", str(tmp_path / "run" / "run_config.json")]) == original
    assert parse_config(["--recipe", str(tmp_path / "run" / "run_config.json"), "--lr", "1e-6"]).optimizer.lr == 1e-6


def test_each_start_is_kept_in_the_history(tmp_path):
    first, second = parse_config(FLAGS), parse_config([*FLAGS, "--override-schedule"])
    second.training.train_steps = 80
    run_config.write(tmp_path, run_config.start_record(first, "random weights", 0, 1))
    run_config.write(tmp_path, run_config.start_record(second, f"resume from {tmp_path}/iter_0000040", 40, 2))
    run_config.write(tmp_path, run_config.start_record(second, f"resume from {tmp_path}/iter_0000060", 60, 2))
    written = json.loads((tmp_path / "run_config.json").read_text())
    assert [(start["iteration"], start["settings"]["train_steps"]) for start in written["history"]] == [(0, 40),
                                                                                                        (40, 80)]
    assert (written["iteration"], written["settings"]["override_schedule"]) == (60, True)
    assert "history" not in written["history"][1]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"settings": {}}'])
def test_an_unreadable_file_is_replaced_with_a_warning(tmp_path, content):
    (tmp_path / "run_config.json").write_text(content)
    warning = run_config.write(tmp_path, run_config.start_record(parse_config(FLAGS), "random weights", 0, 1))
    assert warning.startswith(f"{tmp_path}/run_config.json: unreadable (")
    assert json.loads((tmp_path / "run_config.json").read_text())["history"] == []
