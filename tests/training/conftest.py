"""The one 3-process torchrun launch (``workers/trainer_runs.py``) that the packed pipeline's runs and the refused
start-ups share (test_packed_pipeline.py, test_start_errors.py): launched once per session, on first use; each run
of its plan builds a fresh trainer in the same processes."""
import json
import os
import shutil
import socket
import time

import pytest

from workers import run_python, run_torchrun
from workers.trainer_common import fixture_dir, read_records, run_args, run_plan


@pytest.fixture(scope="session")
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
