"""The trainer on a mixture of experts (the tiny-moe test model, 2 CPU processes at expert-parallel size 2 with the
distributed optimizer, the load-balancing and z losses on): stop-and-resume is bit-exact with dropout; a resume at
expert-parallel size 1 continues within float32 tolerance; the allgather token dispatcher trains as the alltoall one
does; full activation recomputation (routers run again in the backward pass) changes nothing;
every log interval records each MoE layer's expert load and router losses. All runs share one torchrun
launch (tests/workers/trainer_runs.py); a resumed run's reference is the same run uninterrupted.
"""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from workers import run_python, run_torchrun
from workers.trainer_common import fixture_dir, run_args, run_plan, step_records

from megatron_qwen.checkpoint import layout
from megatron_qwen.platform.faults import SIGTERM_AT

pytestmark = pytest.mark.slow  # one 2-process torchrun launch of several trainer runs

STEPS, STOP = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("moe_training")

    def run(name, save_dir=None, env=None, **settings):
        base = dict(expert_parallel=2, rows="padfree", micro_batch_size=2, train_steps=STEPS, warmup_steps=1,
                    moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, log_interval=2)
        flags = run_args(str(data / "plain"), str(data / "moe_start"), str(work / (save_dir or name)),
                         **{**base, **settings})
        return {"name": name, "flags": flags, "env": env or {}}

    plan = [
        run("full", dropout=0.1),
        run("stopped", env={SIGTERM_AT: STOP}, dropout=0.1),
        run("resumed", save_dir="stopped", dropout=0.1),
        run("full_no_dropout"),
        run("allgather", moe_token_dispatcher_type="allgather"),
        # with full recomputation the routers run again in the backward pass
        run("recomputed", recompute="full"),
        run("stopped_no_dropout", env={SIGTERM_AT: STOP}),
        run("resumed_at_ep1", save_dir="stopped_no_dropout", expert_parallel=1),
    ]
    results = run_plan(run_torchrun, 2, plan, work)
    return results, work


def test_a_stopped_run_resumes_bit_exactly(runs):
    results, work = runs
    assert results["stopped"]["ended"] == "SIGTERM" and results["resumed"]["ended"] == "done"
    assert STOP in layout.list_iterations(work / "stopped")  # the stop's save, kept (keep_last 2) with the end's
    full, resumed = step_records(work / "full"), step_records(work / "stopped")
    assert [record["iteration"] for record in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [record[key] for record in resumed] == [record[key] for record in full]


def updates_of(runs, name, save_dir=None, reference="full_no_dropout", rel=1e-6):
    """The update records of run ``name`` (which must have finished; in ``save_dir``, by default its name) and of
    ``reference``, after checking that their losses and gradient norms agree within ``rel``."""
    results, work = runs
    assert results[name]["ended"] == "done"
    records, expected = step_records(work / (save_dir or name)), step_records(work / reference)
    for key in ("loss", "grad_norm"):
        assert [record[key] for record in records] == pytest.approx([record[key] for record in expected], rel=rel)
    return records, expected


def test_a_resume_at_another_expert_parallel_size_continues_the_run(runs):
    _, full = updates_of(runs, "resumed_at_ep1", save_dir="stopped_no_dropout", rel=1e-5)
    # the updates after the stop differ from those before by far more than the tolerance
    assert abs(full[STOP]["loss"] - full[STOP - 1]["loss"]) > 1e-3


def test_the_allgather_dispatcher_trains_as_alltoall_does(runs):
    updates_of(runs, "allgather")


def test_full_recomputation_weighs_the_router_losses_as_without(runs):
    recomputed, plain = updates_of(runs, "recomputed")
    for got, expected in zip(recomputed[1::2], plain[1::2]):
        for name in ("load_max_over_mean", "aux_loss", "z_loss"):
            assert got["moe"][name] == pytest.approx(expected["moe"][name], rel=1e-6)


def test_each_log_interval_records_the_routers_of_each_moe_layer(runs):
    _, work = runs
    records = step_records(work / "full")
    assert ["moe" in record for record in records] == [False, True, False, True]  # --log-interval 2
    for record in records[1::2]:
        moe = record["moe"]
        assert moe["layers"] == [0]  # tiny-moe's layer 1 is dense
        # 8 experts, 2 per token: balanced is 1, every token on the same two experts 4
        assert 1 <= moe["load_max_over_mean"][0] <= 4 and 0 <= moe["load_min_over_mean"][0] <= 1
        assert moe["aux_loss"][0] > 0 and moe["z_loss"][0] > 0
    events = EventAccumulator(str(work / "full" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("load_max_over_mean", "load_min_over_mean", "aux_loss", "z_loss"):
        assert f"moe/{name}/layer_0" in tags
        assert [event.step for event in events.Scalars(f"moe/{name}/layer_0")] == [2, 4]
