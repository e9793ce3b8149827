"""The SFT run: set-up from a ``RunConfig``, then the loop of updates, validation, checkpoints and stops.

Set-up order matters: the model is built (random weights from the run's seed), wrapped in DDP, given the
pretrained weights if any, and only then handed to the optimizer (whose float32 main copies are taken from
the weights at that moment); a resume then overwrites model, optimizer, RNG states, schedule and data
position from the checkpoint.

The loop stops (1) after ``run_length()`` updates, validating and saving the last one; (2) on SIGTERM/SIGUSR1,
saving at the step boundary all ranks agree on; (3) on a NaN or Inf loss or gradient norm, without saving, with
``TrainingDiverged``. Saves also come every ``save_interval`` updates and, with ``save_interval_minutes``, by the
clock.
"""
from __future__ import annotations

import gc
import math
import time

import torch
from megatron.core import parallel_state

from megatron_qwen.batching.source import BatchSource, DataParallelShare, ceil_product
from megatron_qwen.checkpoint import layout
from megatron_qwen.config import RunConfig
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.models.chunks import build_chunks, fusions_in_use, kernel_fusions, token_dispatcher
from megatron_qwen.models.presets import PRESETS
from megatron_qwen.models.router import router_statistics
from megatron_qwen.platform import distributed, faults
from megatron_qwen.platform.fallbacks import fallback_note
from megatron_qwen.platform.log import Phases, stamped
from megatron_qwen.training import checkpointing, run_config, save_dir_lock
from megatron_qwen.training.interrupts import SaveClock, StopRequest
from megatron_qwen.training.lr_schedule import build_scheduler
from megatron_qwen.training.metrics import Reporter, output_dir
from megatron_qwen.training.optimizer import build_optimizer, wrap_ddp
from megatron_qwen.training.step import train_step, validation_loss


FEWEST_HELD_OUT = 10  # held-out conversations below which a validation loss gets a warning


def _on_rank_0(text: str) -> None:
    if distributed.rank_and_size()[0] == 0:
        print(stamped(text), flush=True)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


def _tokenizer(config: RunConfig, start: checkpointing.StartPoint):
    """The run's tokenizer (its files and provenance are what a run needs): ``--tokenizer``, else the one
    recorded in the checkpoint the run starts from."""
    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer)
    if start.iteration_dir is None:
        raise ValueError("--tokenizer: needed when starting from random weights (checkpoints carry their own)")
    return layout.stored_tokenizer(start.iteration_dir)


class Trainer:
    def __init__(self, config: RunConfig, stop: StopRequest | None = None):
        """``stop``: the handlers of the preemption signals, if the caller installed them already (the entry point
        does, before its imports)."""
        self.config = config
        parallel, training = config.parallel, config.training
        # first: a preemption signal during start-up (the rendezvous waits for the last node, a large checkpoint
        # loads for minutes) then stops the run cleanly instead of killing it, which a requeueing launcher would
        # take for a failure
        self.stop, self.owns_stop = (stop, False) if stop is not None else (StopRequest(), True)
        self.save_dir_lock = None
        self.phases = Phases(_on_rank_0, since_process_start=True)
        self.phases.end("process start to trainer (imports)")
        try:
            distributed.initialize(
                tensor_parallel=parallel.tensor_parallel,
                pipeline_parallel=parallel.pipeline_parallel,
                virtual_pipeline_parallel=parallel.virtual_pipeline,
                expert_parallel=parallel.expert_parallel,
                expert_tensor_parallel=parallel.expert_tensor_parallel,
                seed=training.seed,
                timeout_minutes=parallel.distributed_timeout_minutes,
            )
            # before anything reads the save directory (training/save_dir_lock.py)
            self.save_dir_lock = save_dir_lock.take(config.checkpoint.save_dir)
            self.phases.end("distributed init")
            self._set_up()
        except BaseException:
            self._release()
            raise

    def _set_up(self) -> None:
        config = self.config
        parallel, training = config.parallel, config.training
        self.last_saved: int | None = None
        world_size = torch.distributed.get_world_size()
        num_micro_batches = config.num_micro_batches(world_size)
        self.start = checkpointing.start_point(config.checkpoint.save_dir, config.checkpoint.pretrained_checkpoint)
        unverified = checkpointing.verify(self.start, config.checkpoint.skip_verify)
        self.phases.end("checkpoint verify")
        preset = PRESETS[config.model.preset] if config.model.preset else None
        self.model = checkpointing.model_config(self.start, preset)
        config.check_model(self.model)
        self.tokenizer = _tokenizer(config, self.start)
        share = DataParallelShare(parallel_state.get_data_parallel_rank(),
                                  parallel_state.get_data_parallel_world_size(), config.row_multiple(world_size))
        self.batches = BatchSource(config.data, training, share)
        unverified_data = self.batches.check(self.tokenizer.sha256, self.model.vocab_size)
        self.run_record = checkpointing.RunRecord(self.model, self.tokenizer, self.batches.chat_settings())
        self.train_steps, self.warmup_steps = self.run_length()
        self.phases.end("data check")
        fused, fusions_reason = kernel_fusions(config.model.kernel_fusions)
        self.chunks = wrap_ddp(build_chunks(self.model, config.model, parallel, fused), parallel.distributed_optimizer)
        self.phases.end("model build")
        if self.start.kind == "pretrained":
            checkpointing.load_pretrained(self.chunks, self.start)
            self.phases.end("pretrained weights load")
        self.optimizer = build_optimizer(
            self.chunks, config.optimizer, config.model.precision, parallel.distributed_optimizer
        )
        opt = config.optimizer
        self.scheduler = build_scheduler(
            self.optimizer, opt.lr, opt.min_lr, self.warmup_steps, self.train_steps, opt.lr_decay_style,
            opt.weight_decay, opt.override_schedule,
        )
        self.phases.end("optimizer build")
        self.iteration = 0
        self.interval_supervised_tokens = 0  # of the log interval so far (router_statistics)
        rng_outcome = None
        if self.start.kind == "resume":
            state, rng_outcome = checkpointing.load_resume(self.chunks, self.optimizer, self.start,
                                                           self.parallel_layout())
            self.restore(state)
            self.phases.end("resume load")
        self.reporter = Reporter(
            self.model, config, world_size=world_size, writes=torch.distributed.get_rank() == 0,
            train_steps=self.train_steps, resumed_at=self.iteration if self.start.kind == "resume" else None,
        )
        problems = [problem for problem in distributed.all_gathered(self.reporter.problem) if problem]
        if problems:  # on every rank: one that went on alone would wait for the others at its first collective
            self.reporter.close()
            raise ValueError(problems[0])
        self.reporter.print(
            f"start: {self.start.describe()} at iteration {self.iteration}"
            f"{f' ({rng_outcome})' if rng_outcome else ''}; model {self.model.name}; "
            f"layout {self.parallel_layout()}; rows {config.data.rows}, micro-batches of {training.micro_batch_size} "
            f"row(s), {num_micro_batches or 'as many as the packed rows need'} per data-parallel rank and update; "
            f"kernel fusions {fusions_reason}, in use: {', '.join(fusions_in_use(self.chunks)) or 'none'}; "
            f"{fallback_note()}; "
            f"{self.experts_plan()}"
            f"{self.length_plan()}; "
            f"{self.validation_plan()}"
            f"{'' if config.checkpoint.save_dir else f'; no --save-dir: no checkpoints{self.metrics_plan()}'}"
        )
        record = self.write_run_config()
        warnings = [unverified, *unverified_data, *self.batches.rendering_warnings(), self.held_out_warning(), record]
        for warning in filter(None, warnings):
            self.reporter.print(f"warning: {warning}")
        if self.save_dir_lock is not None and self.save_dir_lock.taken_over:
            self.reporter.print(f"warning: {self.save_dir_lock.taken_over}")
        # torch's and megatron-core's imports, the model and the optimizer leave about half a million objects that live
        # as long as the run; every full collection of the cyclic garbage collector would rescan them (a pause
        # on one rank that the others wait for at the next collective). They are moved out of its sight, after
        # one last collection: start-up's garbage (a loaded checkpoint's structures) would never be freed once frozen.
        gc.collect()
        gc.freeze()
        faults.maybe_signal(self.iteration)

    def trainer_state(self) -> dict:
        """What an iteration holds of the run besides weights, optimizer and RNG states (``trainer_state.json``;
        ``restore`` reads it back)."""
        return {
            "iteration": self.iteration,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "layout": self.parallel_layout(),
        }

    def restore(self, state: dict) -> None:
        """The run's position from a resumed iteration's ``trainer_state`` (its ``layout`` decided what
        ``checkpointing.load_resume`` restored)."""
        self.iteration = int(state["iteration"])
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        except ValueError as error:
            raise checkpointing.CheckpointError(f"cannot resume from {self.start.iteration_dir}: {error}") from None
        self.batches.load_state_dict(state["data"])

    def run_length(self) -> tuple[int, int]:
        """(updates, warmup updates) of the run: ``--train-steps``, or with ``--train-epochs`` the fewest updates that
        draw that many passes over the training conversations (planned from the start, so every resume gets the
        same); ``--warmup-steps``, or ``--warmup-fraction`` of the updates, rounded up."""
        training, optimizer = self.config.training, self.config.optimizer
        if training.train_epochs is None:
            steps, length = training.train_steps, f"--train-steps {training.train_steps}"
        else:
            steps = self.batches.updates_for_epochs(training.train_epochs)
            conversations = self.batches.num_train_conversations()
            length = f"--train-epochs {training.train_epochs} of {conversations} training conversations"
        if optimizer.warmup_fraction is None:
            warmup, flag = optimizer.warmup_steps, f"--warmup-steps {optimizer.warmup_steps} (or --warmup-fraction)"
        else:
            warmup = ceil_product(optimizer.warmup_fraction, steps)
            flag = f"--warmup-fraction {optimizer.warmup_fraction} ({warmup} updates)"
        if warmup >= steps:
            raise ValueError(f"{flag}: must be below the run's {steps} updates ({length})")
        return steps, warmup

    def length_plan(self) -> str:
        """The run's length for the start line, in updates and epochs: a recipe written for a large dataset may
        mean many passes over a small one."""
        training = self.config.training
        conversations = self.batches.num_train_conversations()
        updates = f"{self.train_steps} updates ({self.warmup_steps} of warmup)"
        if self.config.data.rows != "pack":
            epochs = self.train_steps * training.global_batch_size / conversations
            return f"{updates}, {epochs:.2f} epochs of {conversations} training conversations"
        if training.train_epochs is None:
            return f"{updates} of packed rows over {conversations} training conversations"
        return (
            f"{updates} of packed rows, the fewest that draw {training.train_epochs} epochs of {conversations} "
            "training conversations"
        )

    def experts_plan(self) -> str:
        """For a mixture of experts, the start line's part on its experts: layout, dispatcher, router losses."""
        if not self.model.is_moe:
            return ""
        parallel, settings = self.config.parallel, self.config.model
        dispatcher, why = token_dispatcher(parallel.moe_token_dispatcher_type)
        layout = self.parallel_layout()
        z_loss = settings.moe_z_loss_coeff
        return (f"experts: EP {layout['expert_parallel']}, expert-TP {layout['expert_tensor_parallel']}, token "
                f"dispatcher {dispatcher} ({why}), no token dropping, load-balancing loss coefficient "
                f"{settings.moe_aux_loss_coeff}{f', z-loss coefficient {z_loss}' if z_loss else ''} per supervised "
                "token; ")

    def validation_plan(self) -> str:
        interval, sets = self.config.training.eval_interval, self.batches.valid_sets
        if not interval or not sets:
            return "no validation"
        return f"validation every {interval} updates on " + ", ".join(
            f"{len(items)} conversations of {name}" for name, items in sets.items()
        )

    def metrics_plan(self) -> str:
        """For a run without a save directory, where its metrics go (the start line)."""
        directory = output_dir(self.config)
        return f", metrics in {directory}" if directory else ", no metrics files (--tensorboard-dir)"

    def held_out_warning(self) -> str | None:
        """A validation loss on a handful of held-out conversations is noise that looks like a measurement."""
        held_out, data = self.batches.num_held_out, self.config.data
        if not data.valid_fraction or not self.config.training.eval_interval or held_out >= FEWEST_HELD_OUT:
            return None
        return (f"--valid-fraction {data.valid_fraction} holds out {held_out} of "
                f"{held_out + self.batches.num_train_conversations()} conversations: a validation loss on fewer than "
                f"{FEWEST_HELD_OUT} is noise (raise it, or validate on --valid-data-path sets with --valid-fraction 0)")

    def write_run_config(self) -> str | None:
        """``SAVE_DIR/run_config.json`` (rank 0; ``training/run_config.py``); a warning when an earlier one was
        unreadable."""
        save_dir = self.config.checkpoint.save_dir
        if not save_dir or torch.distributed.get_rank() != 0:
            return None
        record = run_config.start_record(self.config, self.start.describe(), self.iteration,
                                         torch.distributed.get_world_size())
        return run_config.write(save_dir, record)

    def parallel_layout(self) -> dict:
        """The layout an iteration records (``trainer_state.json``); RNG states are restored only at the same one
        (``checkpointing.saved_layout`` completes those written before the expert entries)."""
        parallel = self.config.parallel
        return {
            "tensor_parallel": parallel.tensor_parallel,
            "pipeline_parallel": parallel.pipeline_parallel,
            "virtual_pipeline": parallel.virtual_pipeline,
            "data_parallel": parallel_state.get_data_parallel_world_size(),
            "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel": parallel_state.get_expert_tensor_parallel_world_size(),
        }

    def save(self) -> None:
        checkpoint = self.config.checkpoint
        started = time.perf_counter()
        path = checkpointing.save(checkpoint, self.iteration, self.chunks, self.optimizer, self.trainer_state(),
                                  self.run_record)
        self.last_saved = self.iteration
        # the time a save takes is what --save-interval-minutes and a preemption's grace period must allow for
        self.reporter.print(f"iteration {self.iteration} | saved {path} in {time.perf_counter() - started:.1f} s")

    def validate(self) -> None:
        results = {
            name: validation_loss(self.chunks, batches, self.batches.shape)
            for name, batches in self.batches.validation_batches().items()
        }
        if results:
            self.reporter.validation(self.iteration, results, self.batches.held_out_sets)

    def train(self) -> str:
        """Runs to the end or to a stop; returns why it stopped (``"done"`` or the signal's name)."""
        training, checkpoint = self.config.training, self.config.checkpoint
        stop, clock = self.stop, SaveClock(checkpoint.save_interval_minutes)
        if stop.agreed(save_due=False)[0]:  # signalled during start-up: the state is the loaded one, nothing to save
            return stop.reason
        while self.iteration < self.train_steps:
            batch = self.batches.next_update()
            self.iteration += 1
            started = time.perf_counter()
            with faults.nan_loss_at(self.iteration, self.chunks):
                result = train_step(self.chunks, self.optimizer, self.scheduler, batch, self.batches.shape)
            seconds = time.perf_counter() - started
            self.reporter.step(self.iteration, result, seconds, self.batches.epochs(), self.router_statistics(result))
            if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                raise TrainingDiverged(
                    f"iteration {self.iteration}: loss {result.loss}, gradient norm {result.grad_norm}; stopping "
                    "without writing a checkpoint from this state (the last saved one is intact)"
                )
            faults.maybe_signal(self.iteration)
            # before validation: a preemption warning's grace period goes to the save, not to a validation pass
            stopping, save_due = stop.agreed(clock.due())
            if stopping:
                if checkpoint.save_dir:
                    self.save()
                return stop.reason
            last = self.iteration == self.train_steps
            if training.eval_interval and (self.iteration % training.eval_interval == 0 or last):
                self.validate()
            if checkpoint.save_dir and (self.iteration % checkpoint.save_interval == 0 or last or save_due):
                self.save()
                clock.reset()
        return "done"

    def router_statistics(self, result) -> dict | None:
        """At the end of a log interval, a mixture of experts' router load and losses over the interval (collective,
        one all-reduce); ``None`` otherwise and for a dense model."""
        self.interval_supervised_tokens += result.supervised_tokens
        if not self.model.is_moe or self.iteration % self.config.training.log_interval:
            return None
        statistics = router_statistics(self.chunks, self.interval_supervised_tokens)
        self.interval_supervised_tokens = 0
        return statistics

    def _release(self) -> None:
        """Gives back what the run holds beyond its objects: the save directory's lock and, when the trainer
        installed them, the signal handlers."""
        if self.owns_stop:
            self.stop.release()
        if self.save_dir_lock is not None:
            self.save_dir_lock.release()
            self.save_dir_lock = None

    def stop_message(self, reason: str) -> str:
        """The last log line of a run stopped by ``reason`` (a signal): what it saved, and how to go on."""
        where = f"stopped by {reason} at iteration {self.iteration}"
        if self.last_saved == self.iteration:
            return f"{where} after saving; run the same command to resume"
        if not self.config.checkpoint.save_dir:
            return f"{where} without saving (no --save-dir)"
        return f"{where}, during start-up, before any update: nothing new to save; run the same command to resume"

    def close(self) -> None:
        self.reporter.close()
        self._release()
        gc.unfreeze()  # a later trainer in this process (tests, the benchmark) may leave this one's cycles to collect
