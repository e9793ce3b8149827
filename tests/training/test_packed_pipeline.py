"""Packed rows equal padded rows at pipeline size 3 (a middle stage exists) with 2-row micro-batches, on 3 CPU
processes (the launch shared with test_start_errors.py: ``runs`` in conftest.py).

The ``pairs`` dataset holds conversations of exactly 16 tokens, so a 32-position packed row holds exactly two
and 4 packed rows hold the same 8 conversations, in the same order, as 8 padded rows: the same supervised
tokens, so the same token-weighted loss, if and only if attention and positions stay inside each
conversation on every stage and for every row of a micro-batch.
"""
import pytest

pytestmark = pytest.mark.slow


def test_packed_equals_padded_at_pipeline_size_3_with_2_row_micro_batches(runs):
    ended, records, _ = runs
    assert ended["pad_pp3_mbs2"]["ended"] == ended["pack_pp3_mbs2"]["ended"] == "done"
    padded, packed = records["pad_pp3_mbs2"], records["pack_pp3_mbs2"]
    assert [r["conversations"] for r in packed] == [r["conversations"] for r in padded] == [8, 8]
    assert [r["supervised_tokens"] for r in packed] == [r["supervised_tokens"] for r in padded]
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5)
    assert packed[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)
