"""Every kind of unusable checkpoint, dataset or save directory (a broken ``latest``, another run's lock) stops the
trainer's start with its own message and leaves the save directory as it was, on 3 CPU processes (the launch shared
with test_packed_pipeline.py: ``runs`` in conftest.py, where the plan and the damaged inputs are made)."""
import json
import os
import socket

import pytest

pytestmark = pytest.mark.slow


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
