"""Dataset integrity, in one process: the stats record a sha256 per chunk of each data file, and the trainer's
start-up check (``BatchSource.check``) refuses changed bytes, negative token ids, loss-mask bytes other than 0 and
1, and damaged indexes with a message naming the file; a dataset written before digests were recorded (the committed
legacy fixture) still passes, with a warning.

Datasets are written with megatron-core's IndexedDatasetBuilder (``tests/workers/trainer_common.py``), the way the
data tool writes them, digests included; the damage is done to their bytes afterwards.
"""
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import LEGACY
from megatron_qwen.data.dataset_files import DatasetFilesError, DIGEST_CHUNK_BYTES
from megatron_qwen.batching.checks import DatasetMismatchError
from workers import trainer_common
from workers.trainer_common import batch_source

SEQ = 16
SHA = "ab" * 32
CONVERSATIONS = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1]), ([12, 13, 14, 15, 16], [0, 0, 0, 1, 1])]


def write(tmp_path, name, conversations=CONVERSATIONS) -> str:
    return trainer_common.write_dataset(tmp_path / name, conversations, SHA, SEQ)


def check(prefix, embedding_rows=100) -> list[str]:
    return batch_source([prefix], seq_length=SEQ, pad_token_id=0).check(SHA, embedding_rows)


def test_the_stats_record_the_sha256_of_each_file(tmp_path):
    prefix = write(tmp_path, "ok")
    recorded = json.loads(Path(f"{prefix}_stats.json").read_text())["digests"]
    assert recorded["chunk_bytes"] == DIGEST_CHUNK_BYTES
    for kind in ("text", "loss_mask"):
        for ext in ("bin", "idx"):
            data = Path(f"{prefix}_{kind}_document.{ext}").read_bytes()  # each smaller than one chunk
            assert recorded["sha256"][f"ok_{kind}_document.{ext}"] == [hashlib.sha256(data).hexdigest()]
    assert check(prefix) == []


def test_the_run_needs_rows_for_the_longest_conversation_whatever_the_dataset_was_built_for(tmp_path):
    # built with --seq-length 512, its longest conversation 5 tokens: 4 positions (the last token is only a label)
    prefix = trainer_common.write_dataset(tmp_path / "short", CONVERSATIONS, SHA, seq_length=512)
    for seq_length in (4, 16):
        assert batch_source([prefix], seq_length=seq_length, pad_token_id=0).check(SHA, 100) == []
    with pytest.raises(DatasetMismatchError, match=rf"^{prefix}_text_document.idx: conversation 2 has 5 tokens, more "
                                                   r"than a row of --seq-length 3 positions holds"):
        batch_source([prefix], seq_length=3, pad_token_id=0).check(SHA, 100)


def test_a_negative_token_id_is_refused(tmp_path):
    prefix = write(tmp_path, "negative", [([5, -3, 7], [0, 1, 1]), *CONVERSATIONS])
    with pytest.raises(DatasetMismatchError, match=rf"^{prefix}_text_document.bin: negative token id -3; "):
        check(prefix)


def test_a_loss_mask_byte_other_than_0_and_1_is_refused(tmp_path):
    prefix = write(tmp_path, "mask", [([5, 6, 7], [0, 2, 1]), *CONVERSATIONS])
    with pytest.raises(DatasetMismatchError, match=rf"^{prefix}_loss_mask_document.bin: loss-mask byte 2 "):
        check(prefix)


def test_a_flipped_byte_of_the_token_file_is_refused(tmp_path):
    prefix = write(tmp_path, "flipped")
    path = Path(f"{prefix}_text_document.bin")
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01  # token 6 becomes 7: a valid id, seen by the digest only
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFilesError, match=rf"^{path}: bytes 0..48 differ from the sha256 recorded"):
        check(prefix)


def shift_first_document(idx: Path) -> None:
    """One token moved from the second document to the first in an ``.idx`` (lengths and offsets agree)."""
    data = bytearray(idx.read_bytes())
    sequences = struct.unpack_from("<Q", data, 18)[0]
    lengths = np.frombuffer(data, np.int32, sequences, 34).copy()
    pointers = np.frombuffer(data, np.int64, sequences, 34 + 4 * sequences).copy()
    element = pointers[1] // lengths[0]
    lengths[0] += 1
    lengths[1] -= 1
    pointers[1] += element
    data[34:34 + 12 * sequences] = lengths.tobytes() + pointers.tobytes()
    idx.write_bytes(bytes(data))


def test_a_one_token_shift_in_both_indexes_is_refused(tmp_path):
    prefix = write(tmp_path, "shifted")
    for kind in ("text", "loss_mask"):
        shift_first_document(Path(f"{prefix}_{kind}_document.idx"))
    with pytest.raises(DatasetFilesError, match=rf"^{prefix}_text_document.idx: bytes 0..\d+ differ from the sha256"):
        check(prefix)


def test_a_legacy_dataset_without_digests_passes_with_a_warning(tmp_path):
    for path in LEGACY.glob("dataset_*"):
        shutil.copyfile(path, tmp_path / path.name)
    prefix = str(tmp_path / "dataset")
    stats = json.loads(Path(f"{prefix}_stats.json").read_text())
    assert "digests" not in stats
    samples = batch_source([prefix], seq_length=512, pad_token_id=0)
    warnings = samples.check(stats["provenance"]["tokenizer"]["sha256"], embedding_rows=151936)
    assert warnings == [f"{prefix}_stats.json: records no digests (written before datasets recorded them); its "
                        "files cannot be verified"]
    # the values are still scanned: its largest id is above 1000
    with pytest.raises(DatasetMismatchError, match=r"_text_document.bin: token id \d+ has no row"):
        samples.check(stats["provenance"]["tokenizer"]["sha256"], embedding_rows=1000)
