"""Parallel correctness on CPU: one model at TP1/PP1, TP2/PP1, TP1/PP2, TP2/PP2 (plus sequence
parallelism and virtual pipeline stages) on 4 gloo processes, from one checkpoint saved at TP2/PP2 (see
tests/workers/parallel_equivalence.py)."""
import pytest
import torch

from workers import run_torchrun

pytestmark = pytest.mark.slow  # a 4-process torchrun launch

LAYOUTS = ["tp1_pp1", "tp2_pp1", "tp1_pp2", "tp2_pp2", "tp2_pp1_sp", "tp2_pp2_sp", "tp2_pp2_vp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("layouts")
    checkpoint_dir = tmp_path_factory.mktemp("checkpoint")
    run_torchrun("parallel_equivalence.py", 4, out_dir, checkpoint_dir, timeout=400)
    return {name: torch.load(out_dir / f"{name}.pt") for name in ["saved", *LAYOUTS]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_saved_at_tp2_pp2_gives_the_same_logits_at(results, layout):
    # the saved weights come from another seed than the models that load them, so equal logits
    # prove that the checkpoint was loaded and resharded, not re-initialized alike
    saved, loaded = results["saved"]["logits"], results[layout]["logits"]
    assert loaded.shape == (4, 32, 1000)
    torch.testing.assert_close(loaded, saved, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["tp2_pp2", "tp2_pp1", "tp1_pp2", "tp2_pp2_vp2"])
def test_training_steps_match_tp1_pp1(results, layout):
    reference, parallel = results["tp1_pp1"], results[layout]
    assert len(parallel["losses"]) == 2
    # step 2's loss also checks that the optimizer update was the same everywhere
    torch.testing.assert_close(parallel["losses"], reference["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(parallel["grad_norms"], reference["grad_norms"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["tp2_pp1", "tp2_pp2"])
def test_sequence_parallelism_matches(results, layout):
    plain, sequence_parallel = results[layout], results[f"{layout}_sp"]
    torch.testing.assert_close(sequence_parallel["losses"], plain["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(sequence_parallel["grad_norms"], plain["grad_norms"], rtol=1e-5, atol=0)


def test_losses_are_those_of_an_untrained_model(results):
    # sanity of the reference itself: ln(1000) for uniform predictions, then a descent
    first, second = results["tp1_pp1"]["losses"]
    assert abs(first - 6.9078) < 0.2
    assert second < first
