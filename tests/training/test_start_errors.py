"""On 3 CPU processes: packed rows equal padded rows at pipeline size 3 (a middle stage exists) with 2-row
micro-batches; and every kind of unusable checkpoint, dataset or save directory (a broken ``latest``, another
run's lock) stops the run with its own message. And the
command line: a bad checkpoint exits 2, and a preemption signal while torch is still importing stops the run
cleanly.

The ``pairs`` dataset holds conversations of exactly 16 tokens, so a 32-position packed row holds exactly two
and 4 packed rows hold the same 8 conversations, in the same order, as 8 padded rows: the same supervised
tokens, so the same token-weighted loss, if and only if attention and positions stay inside each
conversation on every stage and for every row of a micro-batch.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from workers import REPO, run_python, run_torchrun, worker_env
from workers.trainer_common import fixture_dir, read_records, run_args, run_plan


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("pp3")
    start = data / "start"
    bad = prepare_bad_checkpoints(start, work)
    bad_save_dirs = prepare_bad_save_dirs(start, work)

    def entry(name, dataset="pairs", checkpoint=start, **settings):
        settings = {"global_batch_size": 6, **settings}  # a multiple of data-parallel size 3
        flags = run_args(str(data / dataset), str(checkpoint), tensorboard_dir=str(work / name), **settings)
        return {"name": name, "flags": flags}

    pp3 = {"pipeline_parallel": 3, "micro_batch_size": 2}
    plan = [
        # first, while the lock's heartbeat is seconds old
        entry("save_dir_in_use", save_dir=str(bad_save_dirs["save_dir_in_use"])),
        entry("pad_pp3_mbs2", rows="pad", global_batch_size=8, **pp3),
        entry("pack_pp3_mbs2", rows="pack", global_batch_size=4, **pp3),
        entry("missing_checkpoint", checkpoint=work / "no_such_dir"),
        entry("not_a_checkpoint", checkpoint=data),
        entry("unreadable_checkpoint", checkpoint=bad["unreadable"]),
        entry("unreadable_checkpoint_unverified", checkpoint=bad["unreadable"], skip_verify=True),
        # the same size, other bytes: found by the one rank whose share of the digests holds the file
        entry("overwritten_checkpoint", checkpoint=bad["overwritten"]),
        entry("flipped_dataset_byte", dataset=bad["flipped"]),
        entry("shape_mismatch", checkpoint=bad["shape_mismatch"], skip_verify=True),  # its manifest refuses the edit
        entry("preset_mismatch", preset="tiny"),
        entry("wrong_tokenizer", dataset="wrong_tokenizer"),
        entry("big_ids", dataset="big_ids"),
        # pairs: 24 conversations, 6 per update: 2 epochs are 8 updates, too few for a warmup of 8
        entry("warmup_longer_than_epochs", train_epochs=2, warmup_steps=8),
        entry("warmup_fraction_of_everything", warmup_fraction=0.9),  # of 2 updates: 2, rounded up
        # refused once the checkpoint's model and the data are known, before the model is built
        entry("rows_beyond_the_positions", seq_length=4096),
        entry("heads_over_3_ranks", tensor_parallel=3),
        entry("update_beyond_the_data", global_batch_size=27),  # pairs: 24 conversations
    ] + [entry(name, save_dir=str(folder)) for name, folder in bad_save_dirs.items() if name != "save_dir_in_use"]
    ended = run_plan(run_torchrun, 3, plan, work)
    runs = ("pad_pp3_mbs2", "pack_pp3_mbs2")
    return ended, {name: read_records(work / name / "metrics.jsonl") for name in runs}, work


def prepare_bad_checkpoints(start, work):
    unreadable = work / "unreadable"
    shutil.copytree(start, unreadable)
    for shard in (unreadable / "iter_0000000").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    overwritten = work / "overwritten"
    shutil.copytree(start, overwritten)
    shard = overwritten / "iter_0000000" / "__0_1.distcp"
    shard.write_bytes(shard.read_bytes()[:-4096] + b"\0" * 4096)
    flipped = work / "flipped"
    for path in start.parent.glob("pairs_*"):
        shutil.copyfile(path, work / path.name.replace("pairs", "flipped"))
    mask = work / "flipped_loss_mask_document.bin"
    mask.write_bytes(bytes([1 - mask.read_bytes()[0]]) + mask.read_bytes()[1:])  # still 0 or 1: only digests see it
    stats = (work / "flipped_stats.json").read_text()
    (work / "flipped_stats.json").write_text(stats.replace("pairs_", "flipped_"))
    shape_mismatch = work / "shape_mismatch"
    shutil.copytree(start, shape_mismatch)
    config_path = shape_mismatch / "iter_0000000" / "model_config.json"
    config = json.loads(config_path.read_text())
    config["ffn_hidden_size"] = 96  # a model the weights do not fit
    config_path.write_text(json.dumps(config))
    return {"unreadable": unreadable, "shape_mismatch": shape_mismatch, "overwritten": overwritten, "flipped": flipped}


def prepare_bad_save_dirs(start, work):
    """Save directories holding iteration 0 (a copy of ``start``) that a run must not start in: ``latest`` missing,
    a directory or garbage; a directory another run (this process, as far as the lock can tell) is writing to."""
    folders = {}
    for name in ("latest_missing", "latest_a_directory", "latest_garbage", "save_dir_in_use"):
        folders[name] = work / name
        shutil.copytree(start, folders[name])
    for name in ("latest_missing", "latest_a_directory", "latest_garbage"):
        (folders[name] / "latest").unlink()
    (folders["latest_a_directory"] / "latest").mkdir()
    (folders["latest_garbage"] / "latest").write_bytes(b"\xffoops\n")
    (folders["save_dir_in_use"] / "writer.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "job": "1234", "heartbeat": time.time()}))
    return folders


def test_packed_equals_padded_at_pipeline_size_3_with_2_row_micro_batches(runs):
    ended, records, _ = runs
    assert ended["pad_pp3_mbs2"]["ended"] == ended["pack_pp3_mbs2"]["ended"] == "done"
    padded, packed = records["pad_pp3_mbs2"], records["pack_pp3_mbs2"]
    assert [r["conversations"] for r in packed] == [r["conversations"] for r in padded] == [8, 8]
    assert [r["supervised_tokens"] for r in packed] == [r["supervised_tokens"] for r in padded]
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5)
    assert packed[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("missing_checkpoint", "CheckpointError", "no_such_dir does not exist"),
        ("not_a_checkpoint", "CheckpointError", "has no 'latest' marker"),
        ("unreadable_checkpoint", "CheckpointError", "iter_0000000/__0_0.distcp: 100 bytes, but "),
        ("unreadable_checkpoint_unverified", "CheckpointError", "iter_0000000/__0_0.distcp: truncated (100 bytes, "),
        ("overwritten_checkpoint", "CheckpointError", "overwritten/iter_0000000/__0_1.distcp: sha256 differs from the "
                                                      "one recorded when it was written"),
        ("flipped_dataset_byte", "DatasetFilesError", "flipped_loss_mask_document.bin: bytes 0..384 differ from the "
                                                      "sha256 recorded"),
        ("shape_mismatch", "CheckpointError", "linear_fc1.weight has shape (6, 256, 64) in the checkpoint but (6, 192, 64)"),
        ("preset_mismatch", "CheckpointError", "holds another model than --preset tiny (num_layers: checkpoint 6, --preset 4; vocab_size: checkpoint 1024, --preset 151936)"),
        ("wrong_tokenizer", "DatasetMismatchError", "wrong_tokenizer_stats.json: tokenized with a different tokenizer"),
        ("big_ids", "DatasetMismatchError", "token id 5000 has no row in the model's embedding (1024 rows)"),
        ("warmup_longer_than_epochs", "ValueError",
         "--warmup-steps 8 (or --warmup-fraction): must be below the run's 8 updates (--train-epochs 2.0 of 24 training conversations)"),
        ("warmup_fraction_of_everything", "ValueError",
         "--warmup-fraction 0.9 (2 updates): must be below the run's 2 updates (--train-steps 2)"),
        ("rows_beyond_the_positions", "ValueError", "--seq-length: 4096 is above the 2048 positions of tiny-test"),
        ("heads_over_3_ranks", "ValueError",
         "--tensor-parallel: tiny-test's 4 num attention heads do not split evenly over 3 ranks"),
        ("update_beyond_the_data", "ValueError",
         "--global-batch-size 27: one update would draw more than the 24 training conversations (an epoch)"),
        ("latest_missing", "CheckpointError", "latest_missing has no 'latest' marker: not a megatron-qwen checkpoint "
         "directory (iterations found: [0])"),
        ("latest_a_directory", "CheckpointError",
         "latest_a_directory/latest: expected an iteration number, found a directory (iterations found: [0])"),
        ("latest_garbage", "CheckpointError",
         "latest_garbage/latest: expected an iteration number, found '\ufffdoops' (iterations found: [0])"),
        ("save_dir_in_use", "CheckpointError",
         f"save_dir_in_use is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, SLURM job 1234"),
    ],
)
def test_unusable_inputs_stop_with_their_message(runs, name, error, message):
    ended, _, _ = runs
    assert ended[name]["ended"] == error
    assert message in ended[name]["message"]


def test_a_save_dir_a_run_cannot_start_in_is_left_as_it_was(runs):
    # no start from scratch over iterations that no readable 'latest' names, and the holder's lock untouched
    _, _, work = runs
    left = {name: sorted(path.name for path in (work / name).iterdir())
            for name in ("latest_missing", "latest_a_directory", "latest_garbage", "save_dir_in_use")}
    assert left == {
        "latest_missing": ["iter_0000000"], "latest_a_directory": ["iter_0000000", "latest"],
        "latest_garbage": ["iter_0000000", "latest"], "save_dir_in_use": ["iter_0000000", "latest", "writer.lock"],
    }
    assert json.loads((work / "save_dir_in_use" / "writer.lock").read_text())["pid"] == os.getpid()


def run_command_line(*arguments) -> subprocess.CompletedProcess:
    """``python ARGUMENTS`` as a launcher-less process; its status is the test's to check."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300
    )


def test_the_command_line_reports_a_bad_pretrained_checkpoint_and_exits_2(tmp_path_factory, tmp_path):
    data = fixture_dir(tmp_path_factory, run_python)
    flags = run_args(str(data / "plain"), str(tmp_path / "missing"), str(tmp_path / "save"))
    result = run_command_line("-m", "megatron_qwen.train", *flags)
    assert result.returncode == 2
    assert f"--pretrained-checkpoint {tmp_path / 'missing'}: checkpoint directory" in result.stderr
    assert not (tmp_path / "save").exists()  # nothing started from random weights


# Runs the trainer's command line with SIGTERM sent to itself at the moment torch starts importing (the seconds
# every rank spends importing torch and megatron-core, where a scheduler's notice lands as well as anywhere)
SIGNAL_AT_TORCH_IMPORT = """
import os, runpy, signal, sys

class SignalAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SignalAtTorch())
runpy.run_module("megatron_qwen.train", run_name="__main__", alter_sys=True)
"""


def test_a_signal_while_torch_imports_stops_the_run_cleanly_before_any_update(tmp_path_factory, tmp_path):
    data = fixture_dir(tmp_path_factory, run_python)
    flags = run_args(str(data / "plain"), str(data / "start"), str(tmp_path / "save"))
    result = run_command_line("-c", SIGNAL_AT_TORCH_IMPORT, *flags)
    assert result.returncode == 0, result.stderr[-3000:]  # not -15: the default action of SIGTERM
    assert "stopped by SIGTERM at iteration 0, during start-up, before any update" in result.stdout
    assert not (tmp_path / "save" / "tensorboard" / "metrics.jsonl").read_text()
