"""The learning rate used by update k: warmup peak * min(k, W) / W, then constant, cosine or linear."""
import math

import pytest
import torch

from megatron_qwen.training.lr_schedule import build_scheduler

PEAK, WARMUP, STEPS = 2e-6, 1430, 4000


def lrs_used(decay_style, min_lr=0.0, updates=STEPS):
    """{k: lr of update k}, read from the optimizer right when it steps, the way the training loop runs."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], lr=123.0)
    scheduler = build_scheduler(optimizer, PEAK, min_lr, WARMUP, STEPS, decay_style, weight_decay=0.1)
    used = {}
    for update in range(1, updates + 1):
        used[update] = optimizer.param_groups[0]["lr"]
        assert optimizer.param_groups[0]["weight_decay"] == 0.1
        scheduler.step(1)
    return used, scheduler, optimizer


def test_constant_after_warmup():
    used, _, _ = lrs_used("constant")
    assert used[1] == pytest.approx(2e-6 / 1430, rel=1e-12)  # not zero
    assert used[715] == pytest.approx(1e-6, rel=1e-12)
    assert used[1429] < 2e-6
    assert used[1430] == pytest.approx(2e-6, rel=1e-12)  # first update at the peak
    assert used[1431] == pytest.approx(2e-6, rel=1e-12)
    assert used[4000] == pytest.approx(2e-6, rel=1e-12)


def test_cosine_decay_to_zero():
    used, _, _ = lrs_used("cosine")
    assert used[1] == pytest.approx(2e-6 / 1430, rel=1e-12)
    assert used[715] == pytest.approx(1e-6, rel=1e-12)
    assert used[1430] == pytest.approx(2e-6, rel=1e-12)
    # 1 of the 2570 decay updates done: 1e-6 * (1 + cos(pi / 2570)) = 1.99999925...e-6
    assert used[1431] == pytest.approx(1e-6 * (1 + math.cos(math.pi / 2570)), rel=1e-12)
    assert used[1431] < 2e-6
    assert used[2715] == pytest.approx(1e-6, rel=1e-9)  # half way: 1285 of 2570
    assert used[4000] == 0.0


def test_linear_decay_to_a_minimum():
    used, _, _ = lrs_used("linear", min_lr=2e-7)
    assert used[1430] == pytest.approx(2e-6, rel=1e-12)
    assert used[1431] == pytest.approx(2e-7 + 1.8e-6 * (1 - 1 / 2570), rel=1e-12)
    assert used[4000] == pytest.approx(2e-7, rel=1e-12)


def test_resumed_scheduler_continues_with_the_next_update():
    full, _, _ = lrs_used("cosine")
    _, scheduler, _ = lrs_used("cosine", updates=2000)
    state = scheduler.state_dict()
    assert state["num_steps"] == 2000  # megatron's meaning: completed updates
    fresh_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    resumed = build_scheduler(fresh_optimizer, PEAK, 0.0, WARMUP, STEPS, "cosine", weight_decay=0.1)
    resumed.load_state_dict(state)
    assert fresh_optimizer.param_groups[0]["lr"] == full[2001]
    changed = build_scheduler(fresh_optimizer, 1e-5, 0.0, WARMUP, 5000, "cosine", 0.1)
    message = (r"schedule differs .*\(--lr: checkpoint 2e-06, now 1e-05; updates \(--train-steps, --train-epochs\): "
               r"checkpoint 4000, now 5000\)")
    with pytest.raises(ValueError, match=message):
        changed.load_state_dict(state)


def test_an_overridden_schedule_goes_on_from_the_saved_update_by_the_new_settings():
    _, scheduler, _ = lrs_used("cosine", updates=STEPS)  # a finished run
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    longer = build_scheduler(optimizer, PEAK, 0.0, WARMUP, 6000, "cosine", weight_decay=0.1, override=True)
    longer.load_state_dict(scheduler.state_dict())
    assert longer.num_steps == STEPS
    # update 4001 of a cosine decay over updates 1431..6000: 2571 of its 4570 updates done
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 * (1 + math.cos(math.pi * 2571 / 4570)), rel=1e-12)


def test_bad_schedules_are_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="decay style"):
        build_scheduler(optimizer, PEAK, 0.0, WARMUP, STEPS, "exponential", 0.1)
    with pytest.raises(ValueError, match=r"warmup_steps \(4000\)"):
        build_scheduler(optimizer, PEAK, 0.0, 4000, STEPS, "constant", 0.1)
