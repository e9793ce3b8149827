"""The trainer's loss and gradients do not depend on how a global batch is split (4 CPU processes).

Every run starts from the same converter-style checkpoint, reads the same global batches (conversations with
unequal numbers of supervised tokens) and takes 2 updates with dropout off. The reference is data
parallelism over 4 ranks with 1-row micro-batches; each other run changes one thing: micro-batch size,
tensor, pipeline, interleaved pipeline, sequence parallelism, recomputation, the optimizer, packing; and
``--rows padfree``, which must give the reference's very updates from fewer rows at any layout. Equal
first-update loss and gradient norm show the same objective and gradients; an equal second-update loss shows
the same update. Under a mean of per-micro-batch means, 1-row and 2-row micro-batches would already differ.
"""
import pytest

from workers import run_python, run_torchrun
from workers.trainer_common import fixture_dir, read_records, run_args, run_plan

pytestmark = pytest.mark.slow  # one 4-process torchrun launch of many trainer runs

PAD_RUNS = {
    "dp4_mbs1": {},
    "dp4_mbs2": {"micro_batch_size": 2},
    "tp2_dp2_selective_recompute": {"tensor_parallel": 2, "recompute": "selective"},
    "pp2_dp2_mbs2_plain_optimizer_full_recompute": {
        "pipeline_parallel": 2, "micro_batch_size": 2, "distributed_optimizer": False, "recompute": "full",
    },
    "tp2_pp2_sequence_parallel": {"tensor_parallel": 2, "pipeline_parallel": 2, "sequence_parallel": True},
    "pp2_interleaved_3_chunks": {"pipeline_parallel": 2, "virtual_pipeline": 3},
}
PACK_RUNS = {
    "pack_dp4": {"rows": "pack"},
    "pack_tp2_pp2_sequence_parallel_mbs2": {
        "rows": "pack", "tensor_parallel": 2, "pipeline_parallel": 2, "sequence_parallel": True, "micro_batch_size": 2,
    },
}
PADFREE_RUNS = {
    "padfree_dp4": {"rows": "padfree"},
    "padfree_tp2_pp2_sequence_parallel_mbs2": {
        "rows": "padfree", "tensor_parallel": 2, "pipeline_parallel": 2, "sequence_parallel": True,
        "micro_batch_size": 2,
    },
    "padfree_pp2_interleaved_3_chunks": {"rows": "padfree", "pipeline_parallel": 2, "virtual_pipeline": 3},
}
# DP x micro-batch size (x PP, interleaved) on 4 ranks; the 8 conversations of an update fill ~5 rows of 32
PADFREE_ROW_MULTIPLE = {
    "padfree_dp4": 4, "padfree_tp2_pp2_sequence_parallel_mbs2": 2, "padfree_pp2_interleaved_3_chunks": 4,
}
BLEND_RUNS = {
    "blend_dp4": {},
    "blend_tp2_pp2": {"tensor_parallel": 2, "pipeline_parallel": 2},
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    data = fixture_dir(tmp_path_factory, run_python)
    work = tmp_path_factory.mktemp("layouts")

    def entry(name, dataset, settings):
        flags = run_args(dataset, str(data / "start"), tensorboard_dir=str(work / name), **settings)
        return {"name": name, "flags": flags}

    validated = {"valid_fraction": 0.2, "eval_interval": 1}
    plan = [
        entry(name, str(data / "plain"), {**settings, **validated})
        for name, settings in {**PAD_RUNS, **PADFREE_RUNS}.items()
    ]
    plan += [entry(name, str(data / "plain"), settings) for name, settings in PACK_RUNS.items()]
    # 0.4 epochs of the 38 training conversations (48, 10 held out) are 16 draws: 2 updates, whatever --train-steps
    # and eval_interval 5: the only validation is the one after the last update; warmup_fraction 0.5: 1 update
    sampled = {
        **validated, "eval_conversations": 2, "train_epochs": 0.4, "train_steps": 5, "eval_interval": 5,
        "warmup_fraction": 0.5, "warmup_steps": 5,
    }
    plan.append(entry("dp4_sampled_validation", str(data / "plain"), sampled))
    validation_sets = [str(data / "plain_held_out"), str(data / "half_a")]
    plan.append(entry("dp4_validation_sets", str(data / "plain"), {**validated, "valid_data_path": validation_sets}))
    blend = [str(data / "half_a"), str(data / "half_b")]
    blended = {**validated, "data_weights": [1, 3], "valid_data_path": [str(data / "half_a_held_out")]}
    plan += [entry(name, blend, {**settings, **blended}) for name, settings in BLEND_RUNS.items()]
    ended = run_plan(run_torchrun, 4, plan, work)
    assert all(result["ended"] == "done" for result in ended.values()), ended
    return {entry["name"]: read_records(work / entry["name"] / "metrics.jsonl") for entry in plan}


def updates(runs, name):
    return [record for record in runs[name] if "loss" in record]


def assert_same_steps(runs, name, reference):
    mine, expected = updates(runs, name), updates(runs, reference)
    assert [r["iteration"] for r in mine] == [1, 2]
    for field in ("supervised_tokens", "tokens", "conversations"):
        assert [r[field] for r in mine] == [r[field] for r in expected]
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert mine[0]["grad_norm"] == pytest.approx(expected[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("name", [name for name in PAD_RUNS if name != "dp4_mbs1"])
def test_padded_rows_give_the_same_loss_and_gradients_as_plain_data_parallelism(records, name):
    assert_same_steps(records, name, "dp4_mbs1")


def test_the_batch_has_unequal_supervised_tokens_per_micro_batch(records):
    # the premise of the equalities above: a global batch of 8 rows whose supervised-token counts differ
    first = updates(records, "dp4_mbs1")[0]
    assert first["conversations"] == 8 and 0 < first["supervised_tokens"] < first["tokens"]


def test_packed_rows_give_the_same_loss_at_tp2_pp2_with_sequence_parallelism_and_2_row_micro_batches(records):
    assert_same_steps(records, "pack_tp2_pp2_sequence_parallel_mbs2", "pack_dp4")
    assert updates(records, "pack_dp4")[0]["conversations"] > 8  # several conversations per row


@pytest.mark.parametrize("name", PADFREE_RUNS)
def test_padfree_rows_give_the_padded_updates_from_fewer_rows(records, name):
    assert_same_steps(records, name, "dp4_mbs1")  # the same conversations, loss and gradients
    validation = {run: [r["validation_loss"] for r in records[run] if "validation_loss" in r] for run in (name, "dp4_mbs1")}
    assert validation[name] == pytest.approx(validation["dp4_mbs1"], rel=1e-5)
    rows = [r["rows"] for r in updates(records, name)]
    assert [r["rows"] for r in updates(records, "dp4_mbs1")] == [8, 8]
    multiple = PADFREE_ROW_MULTIPLE[name]
    assert all(count % multiple == 0 and count <= 8 for count in rows), rows
    if multiple == 2:
        assert all(count < 8 for count in rows), rows


def test_two_dataset_blending_gives_the_same_loss_at_tp2_pp2(records):
    assert_same_steps(records, "blend_tp2_pp2", "blend_dp4")


def test_each_update_records_the_epochs_drawn_of_each_dataset(records):
    # weights 1:3 over the 16 and 22 training conversations of 20 and 28: 2 and 6 of each update's 8
    assert [r["epochs"] for r in updates(records, "blend_dp4")] == [[2 / 16, 6 / 22], [4 / 16, 12 / 22]]
    assert [r["epochs"] for r in updates(records, "dp4_sampled_validation")] == [[8 / 38], [16 / 38]]


def test_validation_loss_is_logged_and_layout_independent(records):
    reference = [r["validation_loss"] for r in records["dp4_mbs1"] if "validation_loss" in r]
    assert len(reference) == 2 and all(0 < loss < 10 for loss in reference)
    for name in PAD_RUNS:
        found = [r["validation_loss"] for r in records[name] if "validation_loss" in r]
        assert found == pytest.approx(reference, rel=1e-5), name


def test_validation_can_run_on_a_sample_of_the_held_out_conversations(records):
    assert_same_steps(records, "dp4_sampled_validation", "dp4_mbs1")  # --train-epochs 0.4: 2 updates, not 5
    reference = [r["validation_loss"] for r in records["dp4_mbs1"] if "validation_loss" in r]
    sampled = [r for r in records["dp4_sampled_validation"] if "validation_loss" in r]
    assert [r["iteration"] for r in sampled] == [2]  # the last update, though no multiple of --eval-interval 5
    assert abs(sampled[0]["validation_loss"] - reference[1]) > 1e-3  # 2 of the 10 held out


def test_each_validation_only_dataset_gets_a_loss_of_its_own(records):
    assert_same_steps(records, "dp4_validation_sets", "dp4_mbs1")  # they do not change the training stream
    reference = [r["validation_loss"] for r in records["dp4_mbs1"] if "validation_loss" in r]
    found = [r for r in records["dp4_validation_sets"] if "validation_loss" in r]
    keys = ["iteration", "validation_loss", "validation_loss/half_a", "validation_loss/plain_held_out"]
    assert [sorted(record) for record in found] == [keys, keys]
    assert [r["validation_loss"] for r in found] == pytest.approx(reference, rel=1e-5)
    # the held-out conversations written as a dataset of their own give the held-out loss
    assert [r["validation_loss/plain_held_out"] for r in found] == pytest.approx(reference, rel=1e-5)
    assert all(abs(r["validation_loss/half_a"] - r["validation_loss"]) > 1e-3 for r in found)


def test_blended_datasets_report_the_held_out_loss_of_each(records):
    found = {name: [r for r in records[name] if "validation_loss" in r] for name in BLEND_RUNS}
    parts = ["validation_loss/held-out/half_a", "validation_loss/held-out/half_b"]
    assert [sorted(r) for r in found["blend_dp4"]] == [
        sorted(["iteration", "validation_loss", *parts, "validation_loss/half_a_held_out"])
    ] * 2
    for r in found["blend_dp4"]:
        # half_a's held-out conversations written as a dataset of their own give its part
        assert r["validation_loss/held-out/half_a"] == pytest.approx(r["validation_loss/half_a_held_out"], rel=1e-5)
        assert min(r[part] for part in parts) < r["validation_loss"] < max(r[part] for part in parts)
    for tp2_pp2, dp4 in zip(found["blend_tp2_pp2"], found["blend_dp4"]):
        assert tp2_pp2 == pytest.approx(dp4, rel=1e-5)


def test_learning_rate_follows_the_warmup(records):
    # warmup_steps 1: update 1 is already at the peak 1e-3 (the schedule's own test covers the numbering)
    assert [r["lr"] for r in updates(records, "dp4_mbs1")] == [1e-3, 1e-3]
    # half of 2 updates, not --warmup-steps 5 (which would start at 1e-3 / 5)
    assert [r["lr"] for r in updates(records, "dp4_sampled_validation")] == [1e-3, 1e-3]
