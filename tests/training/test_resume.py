"""Checkpoints of the trainer on 4 CPU processes: stop-and-resume is bit-exact with dropout 0.1 and the
distributed optimizer on torch AdamW; a resume at another TP/PP layout and micro-batch size continues within
float32 tolerance; SIGTERM saves and exits (before a validation due at that update), and during start-up exits
before any update, saving nothing; a NaN loss stops without a new checkpoint, and a resume from the checkpoint
before it logs each update once. A run keeps the objects of its start-up out of the garbage collector's scans.

The resumes are checked for packed rows (``--rows pack``) and for the trainer's default, ``--rows padfree``,
whose number of rows and micro-batches changes from update to update and, on the other layout, follows the new
micro-batch size; the stops that do not depend on how rows are built, for padfree only. All runs share one
torchrun launch (tests/workers/trainer_runs.py). The reference for a resumed run is the same run uninterrupted:
its losses and gradient norms, update by update.
"""

import pytest

from workers import run_python, run_torchrun
from workers.trainer_common import fixture_dir, read_records, run_args, run_plan, step_records

from megatron_qwen.checkpoint import layout
from megatron_qwen.platform.faults import NAN_AT, SIGTERM_AT

pytestmark = pytest.mark.slow  # one 4-process torchrun launch of many trainer runs

STEPS = 4
STOP = 2  # the update after which the stopped runs get SIGTERM
ROWS = ("pack", "padfree")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("resume")

    def run(rows, name, save_dir=None, env=None, **settings):
        """Run ``rows/name``, saving into (and resuming from) ``work/rows/save_dir``, by default its name."""
        base = dict(
            tensor_parallel=2, distributed_optimizer=True, rows=rows, micro_batch_size=2, train_steps=STEPS,
            warmup_steps=2, lr_decay_style="cosine",
        )
        save = str(work / rows / (save_dir or name))
        flags = run_args(str(data / "plain"), str(data / "start"), save, **{**base, **settings})
        return {"name": f"{rows}/{name}", "flags": flags, "env": env or {}}

    plan = []
    for rows in ROWS:
        plan += [
            # pack: saves by the clock after every update (keep_last 2): saving must not change the updates either
            run(rows, "full", dropout=0.1, save_interval_minutes=1e-6 if rows == "pack" else None),
            run(rows, "stopped", env={SIGTERM_AT: STOP}, dropout=0.1),
            # a signal during the start-up of the resume: it stops before any update and must change nothing
            run(rows, "signalled_while_resuming", save_dir="stopped", env={SIGTERM_AT: STOP}, dropout=0.1),
            run(rows, "resumed", save_dir="stopped", dropout=0.1),
            run(rows, "full_no_dropout"),
            run(rows, "stopped_no_dropout", env={SIGTERM_AT: STOP}),
            run(rows, "relayout", save_dir="stopped_no_dropout", tensor_parallel=1, pipeline_parallel=2,
                micro_batch_size=1),
        ]
    # what does not depend on how rows are built, for the default only
    plan += [
        run("padfree", "signalled_while_starting", env={SIGTERM_AT: 0}),
        run("padfree", "nan", env={NAN_AT: 2}, save_interval=1),
        # from a copy of what "nan" left: its checkpoint of update 1, and metrics up to the failed update 2
        {**run("padfree", "resumed_after_nan"), "copy": [str(work / "padfree" / "nan"),
                                                        str(work / "padfree" / "resumed_after_nan")]},
        run("padfree", "stopped_at_validation", env={SIGTERM_AT: 2}, valid_fraction=0.2, eval_interval=1),
        # after "resumed" finished: the same directory with a longer run is another schedule
        run("padfree", "longer", save_dir="stopped", dropout=0.1, train_steps=STEPS + 2),
    ]
    results = run_plan(run_torchrun, 4, plan, work)
    return results, work


def regime(runs, rows):
    """One data regime's runs: (how each run ended by name, the regime's save directories)."""
    results, work = runs
    ended = {name.split("/", 1)[1]: result for name, result in results.items() if name.startswith(f"{rows}/")}
    return ended, work / rows


@pytest.fixture(params=ROWS)
def mode(request, runs):
    return regime(runs, request.param)


def test_sigterm_saves_at_the_step_boundary_and_exits(mode):
    results, work = mode
    assert results["stopped"]["ended"] == "SIGTERM"
    assert results["stopped_no_dropout"]["ended"] == "SIGTERM"


def test_a_signal_during_start_up_stops_before_any_update_without_saving(runs):
    results, work = regime(runs, "padfree")
    assert results["signalled_while_starting"]["ended"] == "SIGTERM"
    assert layout.list_iterations(work / "signalled_while_starting") == []
    assert not (work / "signalled_while_starting" / "tensorboard" / "metrics.jsonl").read_text()


def test_a_signal_during_the_start_up_of_a_resume_stops_it_before_any_update(mode):
    results, work = mode
    assert results["signalled_while_resuming"]["ended"] == "SIGTERM"
    # and the resume it interrupted continues bit-exactly: test_resume_is_bit_exact_... below


def test_a_stop_at_a_validation_update_saves_without_validating(runs):
    # validation every update, SIGTERM during update 2: the stop is taken before that update's validation
    results, work = regime(runs, "padfree")
    assert results["stopped_at_validation"]["ended"] == "SIGTERM"
    records = read_records(work / "stopped_at_validation" / "tensorboard" / "metrics.jsonl")
    assert [r["iteration"] for r in records if "validation_loss" in r] == [1]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
    assert layout.latest_iteration(work / "stopped_at_validation") == 2


def test_resume_is_bit_exact_with_dropout_and_the_distributed_optimizer(mode):
    results, work = mode
    assert results["full"]["ended"] == results["resumed"]["ended"] == "done"
    full, stopped_then_resumed = step_records(work / "full"), step_records(work / "stopped")
    assert [r["iteration"] for r in stopped_then_resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in stopped_then_resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in stopped_then_resumed] == [r["grad_norm"] for r in full]
    assert [r["lr"] for r in stopped_then_resumed] == [r["lr"] for r in full]
    assert [r["rows"] for r in stopped_then_resumed] == [r["rows"] for r in full]


def test_dropout_is_on_so_the_rng_state_matters(mode):
    # with dropout 0.1 the losses differ from the same run without dropout: the bit-exact resume above
    # therefore restored the dropout RNG states, not merely deterministic arithmetic
    results, work = mode
    with_dropout, without = step_records(work / "full"), step_records(work / "full_no_dropout")
    assert all(a["loss"] != b["loss"] for a, b in zip(with_dropout[1:], without[1:]))


def test_padfree_updates_take_a_varying_number_of_rows(runs):
    # what sets padfree apart from pack in this module: rows per update follow the conversations' lengths
    # (pack: always the global batch), at most one per conversation, rounded up to a multiple of data-parallel
    # size 2 x micro-batch size 2
    _, work = runs
    rows = [record["rows"] for record in step_records(work / "padfree" / "full")]
    assert all(count % 4 == 0 and count <= 8 for count in rows), rows
    assert len(set(rows)) > 1, rows
    assert [record["rows"] for record in step_records(work / "pack" / "full")] == [8] * STEPS
    # resumed at micro-batch size 1 (still data-parallel size 2) the same conversations take multiples of 2 rows,
    # fewer than before for some update, so the layout test below compares really differently split updates
    before = [record["rows"] for record in step_records(work / "padfree" / "full_no_dropout")][STOP:]
    resumed = [record["rows"] for record in step_records(work / "padfree" / "stopped_no_dropout")][STOP:]
    assert all(count % 2 == 0 for count in resumed), resumed
    assert any(mine < theirs for mine, theirs in zip(resumed, before)), (resumed, before)


def test_resume_at_another_layout_continues_within_float32_tolerance(mode):
    results, work = mode
    assert results["relayout"]["ended"] == "done", results["relayout"]
    reference = step_records(work / "full_no_dropout")
    resumed = step_records(work / "stopped_no_dropout")
    assert [r["iteration"] for r in resumed] == list(range(1, STEPS + 1))
    for mine, expected in zip(resumed[STOP:], reference[STOP:]):
        assert mine["loss"] == pytest.approx(expected["loss"], rel=2e-5)
        assert mine["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-4)


def test_nan_loss_stops_without_a_new_checkpoint(runs):
    results, work = regime(runs, "padfree")
    assert results["nan"]["ended"] == "TrainingDiverged"
    assert "iteration 2: loss nan" in results["nan"]["message"]
    assert layout.latest_iteration(work / "nan") == 1
    assert layout.list_iterations(work / "nan") == [1]


def test_a_resume_from_before_the_last_logged_update_logs_each_update_once(runs):
    # "nan" logged updates 1 and 2 (NaN) but saved only 1: the resume does 2 again, and its metrics.jsonl holds the
    # new record of update 2 alone, so that the file reads as the uninterrupted run's
    results, work = regime(runs, "padfree")
    assert results["resumed_after_nan"]["ended"] == "done"
    resumed, reference = step_records(work / "resumed_after_nan"), step_records(work / "full_no_dropout")
    assert [r["iteration"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_keeps_the_last_checkpoints_and_exports_a_trained_one(mode, tmp_path):
    results, work = mode
    # keep_last 2: the stopped run saved STOP, then STEPS on resume
    assert layout.list_iterations(work / "stopped") == [STOP, STEPS]
    # --save-interval-minutes (pack only): the full run saved after every update, not only at the end
    assert layout.list_iterations(work / "full") == ([STEPS - 1, STEPS] if work.name == "pack" else [STEPS])
    from megatron_qwen.checkpoint.convert import mcore_to_hf

    exported = mcore_to_hf(work / "stopped", tmp_path / "hf")
    assert (exported / "config.json").is_file()


def test_a_resume_with_another_schedule_is_refused_with_the_settings_that_differ(runs):
    results, work = regime(runs, "padfree")
    assert results["longer"]["ended"] == "CheckpointError"
    message = results["longer"]["message"]
    assert f"cannot resume from {work / 'stopped' / layout.iteration_name(STEPS)}: the learning-rate schedule " \
        "differs" in message
    assert f"updates (--train-steps, --train-epochs): checkpoint {STEPS}, now {STEPS + 2}" in message
    assert layout.list_iterations(work / "stopped") == [STOP, STEPS]  # nothing written


def test_a_run_keeps_its_start_up_objects_out_of_the_garbage_collectors_scans(runs):
    # imports, model and optimizer: hundreds of thousands of objects no full collection should rescan while
    # training; a trainer's close hands them back, so that a later one in the process can collect its cycles
    results, _ = runs
    for result in (results["padfree/full"], results["pack/resumed"]):
        assert result["frozen_while_training"] > 100_000, result
        assert result["start_up_garbage_freed"], result  # collected before the freeze, not kept for the whole run
        assert result["frozen_after_close"] == 0, result
