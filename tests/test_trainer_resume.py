"""Checkpoints of the trainer on 4 CPU processes: stop-and-resume is bit-exact with dropout 0.1 and the
distributed optimizer on torch AdamW; a resume at another TP/PP layout continues within float32 tolerance;
SIGTERM saves and exits; a NaN loss stops without a new checkpoint.

All runs share one torchrun launch (tests/workers/trainer_runs.py). The reference for a resumed run is the
same run uninterrupted: its losses and gradient norms, update by update.
"""

import pytest

from conftest import run_python, run_torchrun
from workers.trainer_common import fixture_dir, run_args, run_plan, step_records

from megatron_qwen.checkpoint import layout
from megatron_qwen.training.faults import NAN_AT, SIGTERM_AT

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("resume")

    def flags(name, **settings):
        base = dict(
            tensor_parallel=2, distributed_optimizer=True, rows="pack", micro_batch_size=2, train_steps=STEPS,
            warmup_steps=2, lr_decay_style="cosine",
        )
        return run_args(str(data / "plain"), str(data / "start"), str(work / name), **{**base, **settings})

    plan = [
        {"name": "full", "flags": flags("full", dropout=0.1)},
        {"name": "stopped", "flags": flags("stopped", dropout=0.1), "env": {SIGTERM_AT: 3}},
        {"name": "resumed", "flags": flags("stopped", dropout=0.1)},
        {"name": "full_no_dropout", "flags": flags("full_no_dropout")},
        {"name": "stopped_no_dropout", "flags": flags("stopped_no_dropout"), "env": {SIGTERM_AT: 3}},
        {
            "name": "relayout",
            "flags": flags("stopped_no_dropout", tensor_parallel=1, pipeline_parallel=2, micro_batch_size=1),
        },
        {"name": "nan", "flags": flags("nan", save_interval=1), "env": {NAN_AT: 2}},
    ]
    results = run_plan(run_torchrun, 4, plan, work)
    return results, work


def test_sigterm_saves_at_the_step_boundary_and_exits(runs):
    results, work = runs
    assert results["stopped"]["ended"] == "SIGTERM"
    assert results["stopped_no_dropout"]["ended"] == "SIGTERM"


def test_resume_is_bit_exact_with_dropout_and_the_distributed_optimizer(runs):
    results, work = runs
    assert results["full"]["ended"] == results["resumed"]["ended"] == "done"
    full, stopped_then_resumed = step_records(work / "full"), step_records(work / "stopped")
    assert [r["iteration"] for r in stopped_then_resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in stopped_then_resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in stopped_then_resumed] == [r["grad_norm"] for r in full]
    assert [r["lr"] for r in stopped_then_resumed] == [r["lr"] for r in full]


def test_dropout_is_on_so_the_rng_state_matters(runs):
    # with dropout 0.1 the losses differ from the same run without dropout: the bit-exact resume above
    # therefore restored the dropout RNG states, not merely deterministic arithmetic
    results, work = runs
    with_dropout, without = step_records(work / "full"), step_records(work / "full_no_dropout")
    assert all(a["loss"] != b["loss"] for a, b in zip(with_dropout[1:], without[1:]))


def test_resume_at_another_layout_continues_within_float32_tolerance(runs):
    results, work = runs
    assert results["relayout"]["ended"] == "done", results["relayout"]
    reference = step_records(work / "full_no_dropout")
    resumed = step_records(work / "stopped_no_dropout")
    assert [r["iteration"] for r in resumed] == list(range(1, STEPS + 1))
    for mine, expected in zip(resumed[3:], reference[3:]):
        assert mine["loss"] == pytest.approx(expected["loss"], rel=2e-5)
        assert mine["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-4)


def test_nan_loss_stops_without_a_new_checkpoint(runs):
    results, work = runs
    assert results["nan"]["ended"] == "TrainingDiverged"
    assert "iteration 2: loss nan" in results["nan"]["message"]
    assert layout.latest_iteration(work / "nan") == 1
    assert layout.list_iterations(work / "nan") == [1]


def test_keeps_the_last_checkpoints_and_exports_a_trained_one(runs, tmp_path):
    results, work = runs
    # keep_last 2: the stopped run saved 3, then 6 on resume
    assert layout.list_iterations(work / "stopped") == [3, 6]
    from megatron_qwen.checkpoint.convert import mcore_to_hf

    exported = mcore_to_hf(work / "stopped", tmp_path / "hf")
    assert (exported / "config.json").is_file()
