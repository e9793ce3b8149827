"""Training throughput of this repository's SFT trainer against the plain transformers loop, same data and batch
(``megatron-qwen benchmark``, whose flags are in ``megatron_qwen/cli/benchmark.py``).

For each data regime (``--rows``, one or several) and each preset (random weights; with ``--num-layers`` that many of
its layers, e.g. Qwen3-30B-A3B's layer shape on one GPU) it trains two rows on the same device, one after the other:

* ``ours``: ``training.trainer.Trainer`` itself (its configuration, data pipeline, step and log), for
  ``--warmup + --steps`` updates; flags the command does not know go to the trainer's configuration (e.g.
  ``--recompute selective``; the peer row ignores them).
* ``peer``: what a user would otherwise write: ``transformers``' ``Qwen2ForCausalLM`` (``Qwen3ForCausalLM`` for
  the Qwen3 presets, ``Qwen2MoeForCausalLM``/``Qwen3MoeForCausalLM`` for the mixtures of experts, with
  transformers' default experts implementation: ``grouped_mm`` where torch's grouped GEMM runs, else a loop over
  the experts; no load-balancing loss, ``output_router_logits`` false as in the published configs) with bf16
  weights (float32 with ``--precision fp32``, which the CPU smoke test uses) and ``attn_implementation="sdpa"``,
  ``torch.optim.AdamW`` (``fused=True`` on CUDA), gradient clipping, the
  same global batches (drawn by the trainer's own sampler from the same dataset and seed), micro-batches,
  sequence length, attention and hidden dropout and token-weighted loss (masked cross-entropy summed over
  the global batch and divided once by its supervised-token count). Qwen2 in transformers has no hidden
  dropout, so the peer applies it where megatron does, on the attention and MLP outputs before the
  residual add (forward hooks). Packed rows: positions restart at 0 in every conversation and no attention
  mask is given, from which transformers builds a block-diagonal causal mask (``find_packed_sequence_indices``;
  SDPA then runs with that explicit mask, so not through the flash kernel). Padded rows: plain causal SDPA.
  Several GPUs: torch's ``DistributedDataParallel``, each rank taking the same share of the batch as ours.
* ``peer+compile`` (``--peer-compile``): the peer with ``torch.compile`` on the model.

Data: synthetic ChatML conversations (1-4 turns; lengths log-normal, median ``--median-length``, by default
0.3 x the sequence length) written by the repository's preprocessing (``data/preprocess.py``: the real
tokenizer, ChatML rendering, loss masks on the assistant turns, indexed datasets, stats) into a temporary
directory. Both rows read the same rows; the table shows the non-padding and supervised tokens each row
processed over all its steps, which must be equal.

Reported after the warm-up updates, per row: median step time, non-padding tokens/s per GPU, model TFLOP/s per
GPU and MFU (``training/flops.py``, the trainer's own formula; against ``--peak-tflops``, default the H100 SXM
dense bf16 peak), peak device memory (on the CPU the process's peak resident set, which only grows), and the
optimizer implementation that ran; per preset, the row fill (non-padding positions over rows x sequence length
of the timed updates, the same for both rows); on a GPU, where our row's host synchronisations come from
(CUDA's sync-debug mode: each Python line that made the host wait for the GPU, and how often, over all updates).
Also the bf16 matrix-multiply rate measured on the same device in the same run, and versions, device, command
and date. ``--json FILE`` writes the same numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_qwen.models.presets import PRESETS
from megatron_qwen.training import flops
from megatron_qwen.training.metrics import peak_memory_gib

WORDS = (
    "the of and to in is that for it as with was on be by this are from or have an they which one you were all "
    "we when your can said there use each she do how their if will up other about out many then them these so "
    "some her would make like him into time has look two more write go see number no way could people my than "
    "first water been call who its now find long down day did get come made may part model training data token "
    "loss gradient layer attention batch sequence answer question example function value because result"
).split()


# ---- synthetic data, written by the repository's own preprocessing ----


def synthetic_conversation(rng: random.Random, target_tokens: int) -> dict:
    """A ChatML-like conversation of about ``target_tokens`` tokens (common words are one token each)."""
    turns = 1 + min(int(rng.expovariate(1.0)), 3)
    framing = 12 + 10 * turns  # default system prompt and the ChatML markers around each message
    words = max(2 * turns, target_tokens - framing)
    share = words // turns
    user = max(1, share // 4)  # the assistant writes about three quarters of the words
    messages = []
    for _ in range(turns):
        for role, count in (("user", user), ("assistant", max(1, share - user))):
            messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=count))})
    return {"messages": messages}


def write_dataset(directory: Path, args) -> tuple[str, dict]:
    """Writes the synthetic conversations and preprocesses them; returns (dataset PREFIX, its stats)."""
    from megatron_qwen.data.encode import EncodeSettings
    from megatron_qwen.data.preprocess import PreprocessJob, run

    rng = random.Random(args.seed)
    median = args.median_length or max(16, int(0.3 * args.seq_length))
    source = directory / "conversations.jsonl"
    with open(source, "w", encoding="utf-8") as out:
        for _ in range(args.conversations):
            target = int(rng.lognormvariate(math.log(median), 0.8))
            out.write(json.dumps(synthetic_conversation(rng, target)) + "\n")
    prefix = directory / "synthetic"
    settings = EncodeSettings(seq_length=args.seq_length)
    stats = run(PreprocessJob([source], args.tokenizer, prefix, settings, progress=False))
    return str(prefix), stats


# ---- measurement helpers ----


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Median rate of a bf16 ``size``-cube matrix product on random data."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = []
    for attempt in range(repeats + 3):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if attempt >= 3:
            times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e12


@dataclasses.dataclass
class RowResult:
    name: str
    optimizer: str
    seconds: list[float]  # per update
    tokens: list[int]  # non-padding tokens of the global batch, per update
    rows: list[int]  # rows of the global batch, per update (padfree: they follow the conversations' lengths)
    supervised_tokens: list[int]
    losses: list[float]
    peak_memory_gib: float
    host_syncs: dict[str, int] | None = None  # "file:line" -> count over all updates; CUDA only

    def summary(self, model, seq_length: int, warmup: int, world_size: int, peak_tflops: float) -> dict:
        timed = range(warmup, len(self.seconds))
        rate = lambda counts: statistics.median(counts[i] / self.seconds[i] for i in timed) / world_size  # noqa: E731
        step_flops = [flops.step_flops(model, seq_length, count) for count in self.tokens]
        tflops = rate(step_flops) / 1e12
        return {
            "row": self.name,
            "optimizer": self.optimizer,
            "median_step_s": statistics.median(self.seconds[i] for i in timed),
            "tokens_per_s_per_gpu": rate(self.tokens),
            "tflops_per_gpu": tflops,
            "mfu_percent": 100 * tflops / peak_tflops,
            "peak_memory_gib": self.peak_memory_gib,
            "tokens": sum(self.tokens),
            "rows": sum(self.rows),
            "supervised_tokens": sum(self.supervised_tokens),
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
        }


@contextlib.contextmanager
def profiled(directory: str | None, name: str, device: torch.device):
    """Profiles the block into ``directory/profile_<name>.txt`` (nothing without a directory)."""
    if directory is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        yield
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"profile_{name}.txt").write_text(profile.key_averages().table(sort_by=sort_by, row_limit=40))


@contextlib.contextmanager
def counted_host_syncs(device: torch.device):
    """The host synchronisations in the block, as ``{"file:line": count}`` filled when it ends (CUDA's
    sync-debug mode reports each one as a warning at the Python line that caused it); ``None`` on the CPU."""
    if device.type != "cuda":
        yield None
        return
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchronizing CUDA operation" in str(warning.message):
            where = f"{Path(warning.filename).name}:{warning.lineno}"
            counts[where] = counts.get(where, 0) + 1


# ---- our row: the trainer itself ----


def preset_with_layers(preset: str, num_layers: int | None) -> str:
    """The preset both rows train: ``preset``, or a copy of it with ``num_layers`` layers (dense layers beyond them
    dropped), added to ``PRESETS`` under a name of its own: the trainer takes its model from there."""
    model = PRESETS[preset]
    if num_layers is None or num_layers == model.num_layers:
        return preset
    name = f"{preset}-{num_layers}-layers"
    dense = tuple(layer for layer in model.moe_dense_layers if layer < num_layers)
    PRESETS[name] = dataclasses.replace(model, name=name, num_layers=num_layers, moe_dense_layers=dense)
    return name


def trainer_argv(args, preset: str, rows: str, prefix: str, records_dir: Path, trainer_flags: list[str]) -> list[str]:
    updates = args.warmup + args.steps
    return [
        "--preset", preset, "--data-path", prefix, "--tokenizer", args.tokenizer, "--rows", rows,
        "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
        "--micro-batch-size", str(args.micro_batch_size), "--train-steps", str(updates), "--warmup-steps", "0",
        "--dropout", str(args.dropout), "--valid-fraction", "0", "--eval-interval", "0",
        "--log-interval", str(updates), "--seed", str(args.seed), "--tensorboard-dir", str(records_dir),
        *trainer_flags,
    ]


def run_ours(argv: list[str], records_dir: Path, device: torch.device):
    """Trains with the repository's trainer; returns (row result, run configuration, model config, world size)."""
    from megatron.core import parallel_state

    from megatron_qwen.config import parse_config
    from megatron_qwen.training.optimizer import adam_description
    from megatron_qwen.training.trainer import Trainer

    config = parse_config(argv)
    reset_peak_memory(device)
    trainer = Trainer(config)
    try:
        with counted_host_syncs(device) as host_syncs:
            trainer.train()
        world_size, model, optimizer = torch.distributed.get_world_size(), trainer.model, adam_description(trainer.optimizer)
    finally:
        trainer.close()
    memory = peak_memory_gib()
    del trainer
    parallel_state.destroy_model_parallel()  # the next preset's trainer sets the groups up again
    records_file = records_dir / "metrics.jsonl"  # written by global rank 0 only; other ranks report nothing
    records = [json.loads(line) for line in open(records_file)] if records_file.exists() else []
    updates = [record for record in records if "loss" in record]
    result = RowResult(
        "ours", optimizer, [r["seconds"] for r in updates], [r["tokens"] for r in updates], [r["rows"] for r in updates],
        [r["supervised_tokens"] for r in updates], [r["loss"] for r in updates], memory, host_syncs,
    )
    return result, config, model, world_size


# ---- the peer: plain transformers + torch ----


def peer_model(model_config, dtype: torch.dtype, dropout: float, device: torch.device) -> torch.nn.Module:
    """``Qwen2ForCausalLM`` (``Qwen3ForCausalLM`` for a Qwen3 preset) of the preset's shape, random weights in
    ``dtype``, SDPA attention, the run's dropout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_qwen.checkpoint.convert import LAYOUTS, default_format

    settings = {**LAYOUTS[default_format(model_config)].hf_config(model_config, dtype), "attention_dropout": dropout,
                "use_cache": False}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)

    def hidden_dropout(module, inputs, output):
        if isinstance(output, tuple):  # the attention returns (output, weights)
            return (F.dropout(output[0], dropout, module.training), *output[1:])
        return F.dropout(output, dropout, module.training)

    if dropout > 0:
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(hidden_dropout)
            layer.mlp.register_forward_hook(hidden_dropout)
    return model.train()


def peer_inputs(batch, seq_length: int, device: torch.device) -> dict:
    """A micro-batch as ``[rows, seq_length]`` tensors (a packed micro-batch is its rows concatenated)."""
    rows = lambda tensor: tensor.reshape(-1, seq_length).to(device, non_blocking=True)  # noqa: E731
    return {
        "input_ids": rows(batch.tokens),
        "position_ids": rows(batch.position_ids),
        "labels": rows(batch.labels),
        "loss_mask": rows(batch.loss_mask),
    }


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return total.tolist()


def peer_step(model, optimizer, micro_batches, config, device) -> tuple[float, int, int]:
    """One update over this rank's micro-batches; returns (loss, tokens, supervised tokens) of the global batch."""
    data = config.data
    # counted on the host copies of exactly the tensors fed below, without a device round trip per micro-batch
    local_tokens = sum(float((batch.tokens != data.pad_token_id).sum()) for batch in micro_batches)
    local_supervised = sum(float(batch.loss_mask.sum()) for batch in micro_batches)
    tokens, supervised = all_reduce_sum([local_tokens, local_supervised], device)
    inputs = [peer_inputs(batch, data.seq_length, device) for batch in micro_batches]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # DDP averages gradients over ranks; scaling by the world size makes that the global-batch token mean
    scale = world / supervised
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(inputs):
        last = index == len(inputs) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            per_token = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
            masked_sum = (per_token * batch["loss_mask"].flatten()).sum()
            (masked_sum * scale).backward()
        loss_sum += masked_sum.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
    optimizer.step()
    # host synchronisations at the end of the update, as in ours: the loss and the gradient norm
    (loss_total,), norm = all_reduce_sum([loss_sum.item()], device), grad_norm.item()
    if not (math.isfinite(loss_total) and math.isfinite(norm)):
        raise RuntimeError(f"peer: loss {loss_total}, gradient norm {norm}")
    return loss_total / supervised, int(tokens), int(supervised)


def run_peer(name: str, config, model_config, device: torch.device, compile_model: bool, updates: int) -> RowResult:
    from megatron_qwen.batching.source import BatchSource, DataParallelShare
    from megatron_qwen.models.chunks import params_dtype
    from megatron_qwen.training.optimizer import adam_description

    data, training, settings = config.data, config.training, config.optimizer
    reset_peak_memory(device)
    torch.manual_seed(training.seed)
    dtype = params_dtype(config.model)
    model = peer_model(model_config, dtype, config.model.dropout, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps,
        weight_decay=settings.weight_decay, fused=True if device.type == "cuda" else None,
    )
    rank, world = 0, 1
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # padfree: the peer's rows are ours, up to all-padding rows that round the count to its own ranks
    batches = BatchSource(dataclasses.replace(data, data_weights=None, valid_fraction=0.0, valid_data_path=[]),
                          training, DataParallelShare(rank, world, world * training.micro_batch_size))
    if compile_model:
        model = torch.compile(model)
    seconds, tokens, row_counts, supervised, losses = [], [], [], [], []
    for _ in range(updates):
        batch = batches.next_update()
        synchronize(device)
        started = time.perf_counter()
        loss, step_tokens, step_supervised = peer_step(model, optimizer, batch.micro_batches, config, device)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        tokens.append(step_tokens)
        row_counts.append(len(batch.rows))
        supervised.append(step_supervised)
        losses.append(loss)
    result = RowResult(
        name, adam_description(optimizer), seconds, tokens, row_counts, supervised, losses, peak_memory_gib()
    )
    del model, optimizer
    reset_peak_memory(device)
    return result


# ---- report ----

COLUMNS = (
    ("row", "row", "{}"),
    ("optimizer", "optimizer", "{}"),
    ("median step (s)", "median_step_s", "{:.4g}"),
    ("tokens/s/GPU", "tokens_per_s_per_gpu", "{:.5g}"),
    ("TFLOP/s/GPU", "tflops_per_gpu", "{:.4g}"),
    ("MFU (%)", "mfu_percent", "{:.4g}"),
    ("peak memory (GiB)", "peak_memory_gib", "{:.4g}"),
    ("tokens", "tokens", "{}"),
    ("supervised tokens", "supervised_tokens", "{}"),
    ("first loss", "first_loss", "{:.4f}"),
    ("last loss", "last_loss", "{:.4f}"),
)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(form.format(row[key]) for _, key, form in COLUMNS) + " |")
    return "\n".join(lines)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("megatron-core", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, trainer_flags: list[str]) -> int:
    """Measures and prints (and writes ``args.json``) every row of every data regime and preset."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = int(os.environ.get("RANK", 0))
    say = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(device),
        "versions": versions(),
        "matmul_bf16_tflops": matmul_tflops(device, args.matmul_size or (8192 if device.type == "cuda" else 256)),
    }
    report = {**header, "settings": vars(args), "trainer_flags": trainer_flags, "runs": []}
    with tempfile.TemporaryDirectory(prefix="benchmark_sft_") as work:  # one copy per rank: no shared filesystem needed
        work = Path(work)
        prefix, stats = write_dataset(work, args)
        report["dataset"] = {"conversations": stats["conversations"]["written"], "lengths": stats["conversation_length"]}
        for index, (regime, preset) in enumerate((regime, preset) for regime in args.rows for preset in args.preset):
            run_name = f"{index}_{regime}_{preset}"
            records_dir = work / f"ours_{run_name}"
            trained = preset_with_layers(preset, args.num_layers)
            with profiled(args.profile, f"{run_name}_ours", device):
                ours, config, model, world = run_ours(
                    trainer_argv(args, trained, regime, prefix, records_dir, trainer_flags), records_dir, device
                )
            rows = [ours]
            for name, compile_model in (("peer", False), ("peer+compile", True))[: 1 + args.peer_compile]:
                with profiled(args.profile, f"{run_name}_{name}", device):
                    rows.append(run_peer(name, config, model, device, compile_model, args.warmup + args.steps))
            if rank == 0:
                summaries = [row.summary(model, args.seq_length, args.warmup, world, args.peak_tflops) for row in rows]
                ratio = summaries[0]["tokens_per_s_per_gpu"] / summaries[1]["tokens_per_s_per_gpu"]
                positions = sum(ours.rows[args.warmup :]) * args.seq_length  # both rows saw the same rows
                report["runs"].append({
                    "preset": preset, "num_layers": model.num_layers, "regime": regime, "world_size": world,
                    "rows": summaries,
                    "ours_over_peer_tokens_per_s": ratio,
                    "row_fill": sum(ours.tokens[args.warmup :]) / positions, "ours_host_syncs": ours.host_syncs,
                })
    say(f"\n# SFT training throughput, {header['date']}")
    say(f"command: {header['command']}")
    say(f"device: {header['device']}; bf16 matmul {header['matmul_bf16_tflops']:.4g} TFLOP/s measured "
        f"(MFU against {args.peak_tflops:g} TFLOP/s)")
    say("versions: " + ", ".join(f"{name} {version}" for name, version in header["versions"].items()))
    say(f"data: {report['dataset']['conversations']} synthetic conversations, lengths {report['dataset']['lengths']}; "
        f"seq length {args.seq_length}, global batch {args.global_batch_size} "
        f"(conversations with rows padfree, rows otherwise), "
        f"micro-batch {args.micro_batch_size}, dropout {args.dropout}; {args.warmup} warm-up + {args.steps} timed "
        f"updates per row")
    for result in report["runs"]:
        say(f"\n## {result['preset']} ({result['num_layers']} layers), rows {result['regime']} "
            f"({result['world_size']} GPU(s) / processes)")
        say(table(result["rows"]))
        say(f"ours/peer tokens/s: {result['ours_over_peer_tokens_per_s']:.3f}")
        say(f"row fill: {result['row_fill']:.1%} of the positions of the timed updates are non-padding tokens")
        if result["ours_host_syncs"] is not None:
            updates = args.warmup + args.steps
            found = sorted(result["ours_host_syncs"].items(), key=lambda item: -item[1])
            say(f"ours, host synchronisations over {updates} updates (where: count): "
                + (", ".join(f"{where}: {count}" for where, count in found[:10]) or "none"))
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0

