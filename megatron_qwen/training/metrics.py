"""What the trainer reports: one log line per interval, a JSON-lines record per update, TensorBoard scalars and,
with ``--wandb-project``, the same scalars and the run's settings in Weights & Biases.

What each figure is, wherever it appears: ``loss``, ``grad_norm``, ``lr`` are those of one update (metrics.jsonl's
record, the scalars ``train/loss``, ``train/grad_norm``, ``train/lr`` at every update, and the log line when it
covers one update); the log line of an interval of several updates gives their ``mean loss`` and the last update's
gradient norm and learning rate. Throughput, FLOPs and memory are over the log interval (``throughput/...``,
``memory/...``); validation losses are ``validation/loss[/NAME]`` (metrics.jsonl: ``validation_loss[/NAME]``). A
mixture of experts' routers (``models/router.py``: ``router_statistics``) are reported once per log interval, over
its updates: each MoE layer's expert load (most and fewest tokens any expert received over the mean) and, when on,
its load-balancing and z losses per supervised token, before their coefficients (``moe/...`` per layer; metrics.jsonl:
``moe`` in the interval's last record; the log line: the worst layer's load and the losses summed over layers).

Throughput is per GPU (per process): tokens are the non-padding positions of the global batch, supervised
tokens those with a loss. Model FLOPs come from ``training/flops.py`` (the one formula shared with the
benchmark); MFU is against the H100 SXM dense bf16 peak. Peak memory is the GPU's allocator peak, or on the
CPU the process's peak resident set. Only global rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch

from megatron_qwen.batching.source import HELD_OUT, dataset_names
from megatron_qwen.config import RunConfig
from megatron_qwen.platform.log import stamped
from megatron_qwen.training import flops


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _duration(seconds: float) -> str:
    """``H:MM:SS`` (the updates left at the interval's pace; validations and saves come on top)."""
    minutes, second = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{second:02d}"


def _drop_records_after(path: Path, iteration: int) -> None:
    """Rewrites the JSON-lines file ``path`` (atomically) without the records past ``iteration``, and without a line
    a killed run left unfinished."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _record_iteration(line) <= iteration]
    if len(kept) < len(lines):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)


def _record_iteration(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a record


def output_dir(config: RunConfig) -> str | None:
    """Where the metrics go: ``--tensorboard-dir``, else SAVE_DIR/tensorboard (none without either)."""
    save_dir = config.checkpoint.save_dir
    return config.training.tensorboard_dir or (f"{save_dir}/tensorboard" if save_dir else None)


def _wandb_run(config: RunConfig, directory: str | None):
    """A Weights & Biases run of ``--wandb-project`` holding the run's settings; its files go under ``directory``
    (where the metrics go), else the working directory. ``WANDB_MODE=offline`` keeps them there."""
    import wandb

    save_dir = config.checkpoint.save_dir
    return wandb.init(project=config.training.wandb_project, dir=directory, config=config.settings(),
                      name=Path(save_dir).name if save_dir else None)


ROUTER_LOSSES = ("aux_loss", "z_loss")


def _router_scalars(routers: dict) -> dict:
    """TensorBoard's ``moe/`` group: per layer, and the worst load and the summed losses over layers."""
    values = {}
    for name in ("load_max_over_mean", "load_min_over_mean", *ROUTER_LOSSES):
        for layer, value in zip(routers["layers"], routers.get(name, [])):
            values[f"moe/{name}/layer_{layer}"] = value
    values["moe/load_max_over_mean"] = max(routers["load_max_over_mean"])
    values.update({f"moe/{name}": sum(routers[name]) for name in ROUTER_LOSSES if name in routers})
    return values


def _router_text(routers: dict | None) -> str:
    """The log line's part on the routers: the most loaded layer, and each router loss summed over layers."""
    if routers is None:
        return ""
    loads = routers["load_max_over_mean"]
    worst = max(range(len(loads)), key=loads.__getitem__)
    text = f"expert load max/mean {loads[worst]:.2f} (layer {routers['layers'][worst]}) | "
    return text + "".join(f"{name.replace('_', ' ')} {sum(routers[name]):.4f} | "
                          for name in ROUTER_LOSSES if name in routers)


class Reporter:
    def __init__(self, model, config: RunConfig, *, world_size: int, writes: bool, train_steps: int,
                 resumed_at: int | None):
        """``writes``: this rank writes the log and files (global rank 0); ``resumed_at``: the iteration of the
        checkpoint a resumed run starts from; records of later updates, from a run that went on past that
        checkpoint, are dropped (the updates are done again)."""
        self.model = model
        self.dataset_names = dataset_names(config.data.data_path)  # of the training datasets, for their epochs
        self.train_steps = train_steps
        self.seq_length = config.data.seq_length
        self.world_size = world_size
        self.log_interval = config.training.log_interval
        self.writes = writes
        self.records = None
        self.tensorboard = None
        directory = output_dir(config)
        if writes and directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            records = Path(directory) / "metrics.jsonl"
            if resumed_at is not None:
                _drop_records_after(records, resumed_at)
            self.records = open(records, "a")
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(directory, purge_step=None if resumed_at is None else resumed_at + 1)
        self.wandb, self.problem = None, None  # problem: why the W&B run did not start (Trainer stops every rank)
        if writes and config.training.wandb_project:
            try:
                self.wandb = _wandb_run(config, directory)
            except Exception as error:  # noqa: BLE001 - W&B's own errors (login, network) have no common base
                self.problem = f"--wandb-project {config.training.wandb_project}: W&B did not start ({error})"
        self._interval = []

    def step(self, iteration: int, result, seconds: float, epochs: list[float], routers: dict | None = None) -> None:
        """Records update ``iteration``, after which ``epochs`` of each dataset have been drawn; prints a line every
        ``log_interval`` updates. ``routers``: a mixture of experts' router statistics over the log interval, at its
        end."""
        record = {"iteration": iteration, **vars(result), "seconds": seconds, "epochs": epochs}
        if routers is not None:
            record["moe"] = routers
        self._interval.append(record)
        if self.records is not None:
            self.records.write(json.dumps(record) + "\n")
            self.records.flush()
        names = [""] if len(epochs) == 1 else [f"/{name}" for name in self.dataset_names]
        self.scalars(iteration, {
            **{f"train/{name}": record[name] for name in ("loss", "grad_norm", "lr", "skipped")},
            **{f"train/epoch{name}": epoch for name, epoch in zip(names, epochs)},
            **{f"batch/{name}": record[name] for name in ("conversations", "rows", "tokens", "supervised_tokens")},
        })
        if routers is not None:
            self.scalars(iteration, _router_scalars(routers))
        if iteration % self.log_interval == 0:
            self._line(iteration, routers)
            self._interval = []

    def _line(self, iteration: int, routers: dict | None) -> None:
        records, last = self._interval, self._interval[-1]
        seconds = sum(record["seconds"] for record in records)
        per_gpu = lambda count: count / seconds / self.world_size  # noqa: E731
        total = lambda name: sum(record[name] for record in records)  # noqa: E731
        step_flops = sum(flops.step_flops(self.model, self.seq_length, record["tokens"]) for record in records)
        interval = {
            "throughput/tokens_per_s_per_gpu": per_gpu(total("tokens")),
            "throughput/supervised_tokens_per_s_per_gpu": per_gpu(total("supervised_tokens")),
            "throughput/tflops_per_gpu": per_gpu(step_flops) / 1e12,
            "throughput/mfu": flops.mfu(step_flops, seconds, self.world_size),
            "memory/peak_gib": peak_memory_gib(),
        }
        loss = total("loss") / len(records)
        self.print(
            f"iteration {iteration} | epoch {'/'.join(f'{epoch:.3f}' for epoch in last['epochs'])} | "
            f"{'loss' if len(records) == 1 else 'mean loss'} {loss:.6f} | lr {last['lr']:.4e} | "
            f"grad norm {last['grad_norm']:.4f} | skipped {total('skipped')} | "
            f"nan {sum(not math.isfinite(record['loss']) for record in records)} | "
            f"conversations {last['conversations']} | rows {last['rows']} | "
            f"supervised tokens {last['supervised_tokens']} | "
            f"tokens/s/GPU {interval['throughput/tokens_per_s_per_gpu']:.1f} | "
            f"supervised tokens/s/GPU {interval['throughput/supervised_tokens_per_s_per_gpu']:.1f} | "
            f"TFLOP/s/GPU {interval['throughput/tflops_per_gpu']:.3f} | MFU {100 * interval['throughput/mfu']:.2f}% | "
            f"peak memory {interval['memory/peak_gib']:.2f} GiB | {_router_text(routers)}"
            f"remaining {_duration((self.train_steps - iteration) * seconds / len(records))}"
        )
        self.scalars(iteration, interval)

    def validation(self, iteration: int, results: dict[str, tuple[float, int]], held_out_names) -> None:
        """One record of the losses of every validation set (``results``: name -> (loss, supervised tokens)):
        ``validation_loss`` for the held-out conversations (the token-weighted loss of the ``held_out_names`` sets:
        one, or one per blended dataset), ``validation_loss/NAME`` for every other set and every part."""
        held_out = [results[name] for name in held_out_names]
        values, text = {}, [f"iteration {iteration}"]
        if held_out:
            loss = sum(loss * tokens for loss, tokens in held_out) / sum(tokens for _, tokens in held_out)
            values["validation_loss"] = loss
            text.append(f"validation loss {loss:.6f}")
        for name, (loss, _) in results.items():
            if name != HELD_OUT:
                values[f"validation_loss/{name}"] = loss
                text.append(f"validation loss {name} {loss:.6f}")
        self.print(" | ".join(text))
        if self.records is not None:
            self.records.write(json.dumps({"iteration": iteration, **values}) + "\n")
            self.records.flush()
        self.scalars(iteration, {name.replace("validation_loss", "validation/loss", 1): value
                                 for name, value in values.items()})

    def scalars(self, iteration: int, values: dict) -> None:
        """``values`` (grouped tag -> number) to TensorBoard and W&B, at step ``iteration``."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, float(value), iteration)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=iteration)

    def print(self, text: str) -> None:
        if self.writes:
            print(stamped(text), flush=True)

    def close(self) -> None:
        if self.records is not None:
            self.records.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
