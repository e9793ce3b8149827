"""Hugging Face Qwen checkpoints <-> iteration directories of the megatron-core checkpoint layout.

Both directions go through the tensor-parallel-1, pipeline-parallel-1 ``GPTModel`` built (without
random initialization) in the checkpoint's dtype, so the saved checkpoint has exactly the keys and
sharding the model itself declares, and any TP/PP layout loads it. Tensors stream one mapping
entry at a time: host memory is about the model once, plus one entry on import, plus one output
shard on export.

Embedding rows: the megatron model may pad them (``models.build.padded_vocab_size``); import fills
the padding with zeros, export drops it, so padding never reaches a Hugging Face checkpoint.

Progress (``platform/log.Progress``): a bar on a terminal, a line every 10 s otherwise, tensor by tensor.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from megatron_qwen.checkpoint import hf_chat, hf_qwen1, hf_qwen2, hf_qwen2_moe, hf_qwen3, hf_qwen3_moe, layout, manifest
from megatron_qwen.checkpoint.hf_io import HFCheckpointReader, SafetensorsShardWriter
from megatron_qwen.checkpoint.mapping import EMBEDDING, OUTPUT_LAYER, from_megatron, ignorable, to_megatron
from megatron_qwen.data.chatml import DEFAULT_SYSTEM_PROMPT
from megatron_qwen.data.reasoning_history import DEFAULT_REASONING_HISTORY
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.models.build import build_model
from megatron_qwen.models.presets import QwenConfig, from_hf_config
from megatron_qwen.platform import distributed
from megatron_qwen.platform.log import Progress

LAYOUTS = {module.FORMAT: module for module in (hf_qwen1, hf_qwen2, hf_qwen3, hf_qwen2_moe, hf_qwen3_moe)}
_PADDED = (EMBEDDING, OUTPUT_LAYER)


def hf_to_mcore(hf_dir: str | Path, mcore_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Converts a Hugging Face checkpoint (any of the five layouts) into iteration 0 of ``mcore_dir``."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--hf-dir {hf_dir}: no config.json (expected a Hugging Face model directory)")
    if layout.list_iterations(mcore_dir) or (Path(mcore_dir) / layout.LATEST).exists():
        raise FileExistsError(f"--mcore-dir {mcore_dir} already holds a checkpoint; choose a new directory")
    cfg = from_hf_config(config_path)
    reader = HFCheckpointReader(hf_dir)
    if cfg.is_moe:
        reader = hf_qwen2_moe.PerExpertNames(reader, cfg)
    entries = list(LAYOUTS[cfg.generation].entries(cfg))
    _check_names(reader, cfg, entries)
    tokenizer = load_tokenizer(str(tokenizer_dir or hf_dir))
    with _single_process():
        model = empty_model(cfg, reader.dtype(), cpu=True)
        _fill(model.state_dict(), to_megatron(entries, reader.read), cfg.vocab_size)
        return layout.save_iteration(
            mcore_dir, 0, model.sharded_state_dict(), model_config=cfg, tokenizer=tokenizer
        )


def mcore_to_hf(
    mcore_dir: str | Path,
    hf_dir: str | Path,
    hf_format: str | None = None,
    iteration: int | None = None,
    max_shard_bytes: int = 2 * 2**30,
    system_prompt: str | None = None,
    reasoning_history: str | None = None,
    skip_verify: bool = False,
) -> Path:
    """Writes one iteration of ``mcore_dir`` as a Hugging Face model directory in ``hf_format`` (default:
    ``default_format`` of the model), first under ``HF_DIR.partial``, renamed when complete (removed when the export
    fails). The chat template follows ``system_prompt`` and ``reasoning_history`` where given (see
    ``template_settings``). The iteration's files are checked against its manifest first (unless ``skip_verify``),
    and weights that are not finite are refused."""
    if hf_format is not None and hf_format not in LAYOUTS:
        raise ValueError(f"--format must be one of {sorted(LAYOUTS)}, not {hf_format!r}")
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise FileExistsError(f"--hf-dir {hf_dir} exists and is not empty; choose a new directory")
    iteration_dir = layout.resolve_iteration(mcore_dir, iteration)
    if not skip_verify:
        unverified = manifest.verify(iteration_dir)
        if unverified:
            print(f"warning: {unverified}", file=sys.stderr)
    cfg = layout.load_config(iteration_dir)
    hf_format = hf_format or default_format(cfg)
    entries = list(LAYOUTS[hf_format].entries(cfg))  # fails early for a model the format cannot hold
    system_prompt, reasoning_history = template_settings(iteration_dir, system_prompt, reasoning_history)
    tokenizer = layout.stored_tokenizer(iteration_dir)
    staging = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        dtype = _export_weights(iteration_dir, cfg, entries, SafetensorsShardWriter(staging, max_shard_bytes))
        (staging / "config.json").write_text(json.dumps(LAYOUTS[hf_format].hf_config(cfg, dtype), indent=2) + "\n")
        for name, content in layout.tokenizer_files(tokenizer).items():
            (staging / name).write_bytes(content)
        hf_chat.write_chat_files(staging, tokenizer.manifest["kind"], system_prompt, reasoning_history)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if hf_dir.exists():
        hf_dir.rmdir()
    staging.rename(hf_dir)
    return hf_dir


def template_settings(iteration_dir: Path, system_prompt: str | None, reasoning_history: str | None) -> tuple[str, str]:
    """The chat template's default system prompt and reasoning history: the given ones, else those the training
    data was preprocessed with (``tools/preprocess_chatml.py --system-prompt``, ``--reasoning-history``,
    recorded by the trainer), so that the served model sees what it was trained on; for a checkpoint the
    trainer did not write, the preprocessing defaults."""
    recorded = layout.training_chat_settings(iteration_dir)
    if recorded is None:
        recorded = {"system_prompts": [DEFAULT_SYSTEM_PROMPT], "reasoning_history": [DEFAULT_REASONING_HISTORY]}
    if system_prompt is None:
        system_prompt = _the_one(recorded["system_prompts"], iteration_dir, "default system prompts",
                                 "--system-prompt ('' for none)")
    if reasoning_history is None:
        reasoning_history = _the_one(recorded["reasoning_history"], iteration_dir, "reasoning histories",
                                     "--reasoning-history")
    return system_prompt, reasoning_history


def _the_one(values: list[str], iteration_dir: Path, what: str, option: str) -> str:
    if len(values) > 1:
        raise ValueError(f"{iteration_dir}: trained on datasets with different {what} {values}; "
                         f"choose the chat template's with {option}")
    return values[0]


def default_format(cfg: QwenConfig) -> str:
    """The layout ``transformers`` loads without remote code: the model's own, Qwen2's for the first generation."""
    return hf_qwen2.FORMAT if cfg.generation == hf_qwen1.FORMAT else cfg.generation


def _export_weights(iteration_dir: Path, cfg: QwenConfig, entries, writer: SafetensorsShardWriter) -> torch.dtype:
    """Loads the iteration into the TP1/PP1 model and streams its tensors out; returns their dtype."""
    with _single_process():
        dtype = layout.checkpoint_dtype(iteration_dir)
        model = empty_model(cfg, dtype, cpu=True)
        layout.load_model(model, iteration_dir)
        params = model.state_dict()
        with Progress("mcore-to-hf", "tensors written") as progress:
            for name, tensor in from_megatron(entries, lambda megatron_name: _unpadded(params, megatron_name, cfg)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{iteration_dir}: {name} holds {(~torch.isfinite(tensor)).sum().item()} "
                                     "non-finite values (NaN or Inf); a model that diverged or a damaged checkpoint is "
                                     "not exported")
                writer.add(name, tensor)
                progress.update()
        writer.finish()
    return dtype


class _single_process:
    """torch.distributed and megatron's groups for one process (TP1/PP1), unless already set up."""

    def __enter__(self):
        self._owned = not torch.distributed.is_initialized()
        if self._owned:
            distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
        elif torch.distributed.get_world_size() > 1:
            raise RuntimeError("the converter runs as a single process; do not start it under torchrun")
        return self

    def __exit__(self, *exc):
        if self._owned:
            distributed.destroy()


def empty_model(cfg: QwenConfig, dtype: torch.dtype, cpu: bool | None = None, layer_impl: str = "local"):
    """This rank's part of the model at the current parallel layout, in ``dtype``, with weights left
    uninitialized (a checkpoint overwrites them all). ``cpu=None``: on the GPU when there is one."""
    return build_model(
        cfg,
        layer_impl=layer_impl,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        perform_initialization=False,
        cpu=cpu,
    )


def _fill(params: dict[str, torch.Tensor], tensors, vocab_size: int) -> None:
    """Copies each (megatron name, tensor) into the model; embedding padding rows become zero."""
    missing = {name for name, value in params.items() if isinstance(value, torch.Tensor)}
    with Progress("hf-to-mcore", "tensors read", total=len(missing)) as progress:
        for name, tensor in tensors:
            _copy_into(params, name, tensor, vocab_size)
            missing.discard(name)
            progress.update()
    if missing:
        raise ValueError(f"the mapping left megatron parameters unset: {sorted(missing)}")


def _copy_into(params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, vocab_size: int) -> None:
    """Copies ``tensor`` into the model's parameter ``name``; the embedding's padding rows become zero."""
    if name not in params:
        raise KeyError(f"the megatron model has no parameter {name!r}")
    target = params[name]
    if name in _PADDED:
        target[vocab_size:].zero_()
        target = target[:vocab_size]
    if target.shape != tensor.shape:
        raise ValueError(f"{name}: the checkpoint's shape {tuple(tensor.shape)} does not match the "
                         f"configuration's {tuple(target.shape)}")
    target.copy_(tensor)


def _check_names(reader: HFCheckpointReader | hf_qwen2_moe.PerExpertNames, cfg: QwenConfig, entries) -> None:
    """Fails before any work when the checkpoint lacks a tensor of its layout or has a foreign one."""
    needed = {name for entry in entries for name in entry.hf}
    present = set(reader.names())
    for problem, names in (
        (f"tensors the {cfg.generation} layout needs but the checkpoint lacks", needed - present),
        (f"tensors the {cfg.generation} layout does not know",
         {n for n in present - needed if not ignorable(cfg.tied_embeddings, n)}),
    ):
        if names:
            shown = sorted(names)[:8]
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise ValueError(f"{reader.dir}: {problem}: {shown}{more}")


def _unpadded(params: dict[str, torch.Tensor], name: str, cfg: QwenConfig) -> torch.Tensor:
    tensor = params[name]
    return tensor[: cfg.vocab_size] if name in _PADDED else tensor
