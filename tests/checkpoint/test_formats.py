"""Checkpoints and datasets written by earlier commits still resume and train (formats are promises).

``data_fixtures/before_layout/`` was written by commit e0b86aa, before the runtime data pipeline moved out of
``training/`` (``data_fixtures/write_fixtures.py``): a run of 4 updates stopped by SIGTERM after update 2, its
start checkpoint and its dataset, with the losses and gradient norms of the same run uninterrupted, as that commit
computed them. Resuming the committed save directory with today's code must continue that run: the same updates
3 and 4 (float32 tolerance, which covers another CPU's kernels; on the machine that wrote it they are bit-equal).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.trainer_common import step_records

from data_fixtures import BEFORE_LAYOUT, fixture_copy
from megatron_qwen.platform import distributed
from megatron_qwen.config import parse_config
from megatron_qwen.training.trainer import Trainer

pytestmark = pytest.mark.slow  # a trainer resumed and trained in this process


def test_a_run_saved_before_the_layout_change_resumes_with_its_next_losses(tmp_path, monkeypatch):
    monkeypatch.chdir(fixture_copy(BEFORE_LAYOUT, tmp_path / "run"))  # the run named its files relative to here
    expected = json.loads(Path("expected.json").read_text())
    trainer = Trainer(parse_config(expected["flags"]))
    try:
        assert trainer.start.kind == "resume" and trainer.iteration == expected["stopped_after"]
        assert trainer.train() == "done"
    finally:
        trainer.close()
        distributed.destroy()
    records = step_records("save")
    assert [record["iteration"] for record in records] == [1, 2, 3, 4]  # 1-2 kept from before, each logged once
    for record, reference in zip(records[2:], expected["updates"][2:]):
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=0)
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5, abs=0)
