"""Writes the trainer tests' fixtures into OUT_DIR (one process): datasets and a starting checkpoint.

Usage: python trainer_setup.py OUT_DIR

- ``plain``: 48 conversations of 6..32 tokens, random prompt lengths (unequal supervised counts);
- ``plain_held_out``: the 10 of them that ``--valid-fraction 0.2`` holds out, as a dataset of their own;
- ``half_a``, ``half_b``: two further datasets for blending; ``half_a_held_out`` as ``plain_held_out``;
- ``pairs``: 24 conversations of exactly 16 tokens, so that a 32-position row packs exactly two;
- ``wrong_tokenizer``: stats naming another tokenizer; ``big_ids``: token ids the test model has no row for;
- ``start/``: iteration 0 of the 6-layer, 1024-row test model, as the converter writes it; ``moe_start/``: of the
  mixture-of-experts test model.
"""
import sys
from pathlib import Path

from trainer_common import random_conversations, test_moe_model, tokenizer, write_dataset, write_start_checkpoint

from megatron_qwen.batching.order import split_conversations


def main(out_dir):
    out = Path(out_dir)
    sha = tokenizer().sha256
    plain = random_conversations(48, seed=1)
    write_dataset(out / "plain", plain, sha)
    _, held_out = split_conversations(len(plain), 0.2, "plain")
    write_dataset(out / "plain_held_out", [plain[index] for index in held_out], sha)
    half_a = random_conversations(20, seed=2)
    write_dataset(out / "half_a", half_a, sha)
    _, held_out = split_conversations(len(half_a), 0.2, "half_a")
    write_dataset(out / "half_a_held_out", [half_a[index] for index in held_out], sha)
    write_dataset(out / "half_b", random_conversations(28, seed=3), sha)
    write_dataset(out / "pairs", random_conversations(24, seed=4, lengths=(16, 17)), sha)
    write_dataset(out / "wrong_tokenizer", random_conversations(8, seed=5), "0" * 64)
    write_dataset(out / "big_ids", [([1, 2, 5000, 3], [0, 0, 1, 1])] * 8, sha)
    write_start_checkpoint(out / "start")
    write_start_checkpoint(out / "moe_start", test_moe_model())


if __name__ == "__main__":
    main(sys.argv[1])
