"""RNG states across device kinds (``training/rng.py``): a checkpoint's tracker states are CUDA generator states
(16 bytes) when a GPU wrote it and CPU generator states (5,056 bytes) in CPU mode; megatron's tracker takes either
without a check and fails at the first dropout on the other kind. Restoring states of another kind must leave every
generator as it is (the run goes on from its seed) and say why; checkpoints from before the device kind was
recorded are told apart by the states' size."""
import random

import numpy as np
import pytest
import torch
from megatron.core import tensor_parallel

from data_fixtures import LEGACY
from megatron_qwen.training import rng

CUDA_STATE = torch.arange(16, dtype=torch.uint8)  # what torch.cuda.get_rng_state() returns: seed and offset


def cpu_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def saved_states(tracker_state: torch.Tensor, device: str | None, seed: int) -> dict:
    """States in the checkpoint's format, as written before (``device`` None) or after the kind was recorded."""
    python, numpy_ = random.Random(seed), np.random.RandomState(seed)
    states = {"python": python.getstate(), "numpy": numpy_.get_state(), "torch": cpu_state(seed),
              "tracker": {"model-parallel-rng": tracker_state}}
    if tracker_state.numel() == 16:
        states["cuda"] = CUDA_STATE
    return states if device is None else {"device": device, **states}


def draws() -> tuple:
    """One draw from each generator ``restore`` sets (taken on copies: the generators are not advanced)."""
    python, numpy_, torch_ = random.getstate(), np.random.get_state(), torch.get_rng_state()
    found = (random.random(), np.random.random(), torch.rand(1).item())
    random.setstate(python), np.random.set_state(numpy_), torch.set_rng_state(torch_)
    return found


@pytest.fixture
def tracker():
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (tracker.states_, tracker._is_initialized)
    tracker.set_states({"model-parallel-rng": cpu_state(99)})
    yield tracker
    tracker.states_, tracker._is_initialized = saved


@pytest.mark.parametrize(
    "tracker_state, device, here",
    [(CUDA_STATE, None, "cpu"), (CUDA_STATE, "cuda", "cpu"), (cpu_state(3), None, "cuda"), (cpu_state(3), "cpu", "cuda")],
    ids=["gpu-before-on-cpu", "gpu-on-cpu", "cpu-before-on-gpu", "cpu-on-gpu"],
)
def test_states_of_another_device_kind_leave_every_generator_alone(tracker, tracker_state, device, here):
    before, tracker_before = draws(), dict(tracker.get_states())
    saved = saved_states(tracker_state, device, seed=5)
    assert rng.restore(saved, here=here) == f"saved on {'cuda' if tracker_state.numel() == 16 else 'cpu'}, running on {here}"
    assert draws() == before
    after = tracker.get_states()
    assert after.keys() == tracker_before.keys()
    assert all(torch.equal(after[name], state) for name, state in tracker_before.items())


@pytest.mark.parametrize("device", [None, "cpu"], ids=["before", "recorded"])
def test_states_of_the_same_kind_are_restored(tracker, device):
    saved = saved_states(cpu_state(3), device, seed=5)
    assert rng.restore(saved, here="cpu") is None
    expected = (random.Random(5).random(), np.random.RandomState(5).random(),
                torch.rand(1, generator=torch.Generator().manual_seed(5)).item())
    assert draws() == expected
    assert torch.equal(tracker.get_states()["model-parallel-rng"], cpu_state(3))


def test_captured_states_record_their_device_kind(tracker):
    assert rng.capture()["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_checkpoint_from_before_the_device_kind_holds_cpu_states_told_by_their_size():
    # the committed legacy iteration (written by the trainer on this CPU before states recorded their kind)
    from megatron.core import dist_checkpointing

    from megatron_qwen.platform import distributed

    iteration = LEGACY / "checkpoint" / "iter_0000001"
    distributed.initialize(seed=1)
    try:
        states = dist_checkpointing.load({rng.KEY: rng.sharded_object()}, str(iteration))[rng.KEY]
    finally:
        distributed.destroy()
    assert "device" not in states
    assert {state.numel() for state in states["tracker"].values()} == {5056}
    assert rng.saved_kind(states) == "cpu"
