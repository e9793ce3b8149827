"""The learning-rate schedule: megatron-core's ``OptimizerParamScheduler`` with the recipe's update numbering.

The recipe: update ``k`` (k = 1, 2, ...) uses ``lr = peak * min(k, W) / W`` during warmup, so the first update
is not at zero and update ``W`` is the first at the peak; afterwards constant (default), or cosine or linear
decay reaching ``min_lr`` at the last update ``train_steps``.

megatron-core evaluates its schedule at ``num_steps``, the number of completed updates (0 before the first),
and the training loop calls ``step(1)`` after each update, so update ``k`` would run at ``num_steps = k - 1``:
the first update at lr 0 and the peak one update late. ``UpdateNumberedScheduler`` keeps megatron's counter
and its checkpoint format unchanged (``num_steps`` = completed updates, restored by ``load_state_dict``) and
only evaluates the schedule one step ahead, at ``num_steps + 1``, the number of the update about to run.

A resume keeps the schedule the run started with (``KEPT_AT_RESUME``), unless it overrides it
(``--override-schedule``, megatron's ``override_opt_param_scheduler``): the resumed run then takes only the count
of updates done from the checkpoint and schedules the updates after it by its own settings.
"""
from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

DECAY_STYLES = ("constant", "cosine", "linear")
# what a resume must keep of the schedule the run started with, and the settings that decide it
KEPT_AT_RESUME = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "warmup updates (--warmup-steps, --warmup-fraction)",
    "lr_decay_steps": "updates (--train-steps, --train-epochs)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
}


class UpdateNumberedScheduler(OptimizerParamScheduler):
    """Sets on the param groups the lr of update ``num_steps + 1``; call ``step(1)`` after every update."""

    def get_lr(self, param_group: dict) -> float:
        completed = self.num_steps
        self.num_steps = completed + 1
        try:
            return super().get_lr(param_group)
        finally:
            self.num_steps = completed

    def load_state_dict(self, state: dict) -> None:
        """Restores the updates done; unless the schedule is overridden, one that differs from the saved one is
        refused with the settings that differ (megatron's own check is a bare assertion)."""
        if self.override_opt_param_scheduler:
            super().load_state_dict(state)
            return
        current = self.state_dict()
        differing = [
            f"{setting}: checkpoint {state.get(key)}, now {current[key]}"
            for key, setting in KEPT_AT_RESUME.items()
            if state.get(key) != current[key]
        ]
        if differing:
            raise ValueError(
                f"the learning-rate schedule differs from the one the run started with ({'; '.join(differing)}); "
                "resume with the run's settings, schedule the updates after the checkpoint by the new ones with "
                "--override-schedule, or start a new run from these weights with --pretrained-checkpoint"
            )
        super().load_state_dict(state)


def build_scheduler(
    optimizer,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    train_steps: int,
    decay_style: str,
    weight_decay: float,
    override: bool = False,
) -> UpdateNumberedScheduler:
    """The schedule of a run of ``train_steps`` updates over ``optimizer``'s param groups; ``override``: a resume
    keeps these settings instead of requiring the saved ones."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"lr decay style must be one of {DECAY_STYLES}, got {decay_style!r}")
    if not 0 <= warmup_steps < train_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, train_steps={train_steps})")
    return UpdateNumberedScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=train_steps,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
        # A resumed run keeps the schedule it started with; a changed recipe value is refused, not mixed in.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=override,
    )
