"""Runs a whole preprocessing job: read rows, encode them in worker processes, write the dataset.

Batches go to the workers and come back in input order through a bounded window, so memory stays
bounded whatever the input size and the output is byte-identical for any number of workers. With
``on_error="fail"`` the first bad row stops the run, naming its file and line, and nothing is written
under PREFIX; with ``"skip"`` bad rows go to ``PREFIX_rejects.jsonl`` with their reasons.
"""
from __future__ import annotations

import collections
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from megatron_qwen.data.dataset_files import StagedDataset
from megatron_qwen.data.encode import ConversationEncoder, EncodedBatch, EncodeSettings
from megatron_qwen.data.sources import BATCH_BYTES, read_batches
from megatron_qwen.data.stats import DatasetStats
from megatron_qwen.data.tokenizer import load_tokenizer

ON_ERROR = ("fail", "skip")
STATS_FORMAT = "megatron-qwen-sft-dataset/1"


class InputError(ValueError):
    """A bad input row under ``on_error="fail"``; the message names the file and line."""


@dataclass(frozen=True)
class PreprocessJob:
    inputs: Sequence[Path]
    tokenizer: str
    output_prefix: Path
    settings: EncodeSettings = EncodeSettings()
    workers: int = 1
    on_error: str = "fail"
    progress: bool = True
    batch_bytes: int = BATCH_BYTES  # input bytes per unit of work sent to a worker

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        for path in self.inputs:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--input {path}: no such file")


def run(job: PreprocessJob) -> dict:
    """Run ``job`` and return the stats it wrote to ``PREFIX_stats.json``."""
    tokenizer = load_tokenizer(job.tokenizer)
    encoder = ConversationEncoder(tokenizer, job.settings)
    stats = DatasetStats(job.settings.seq_length)
    staging = StagedDataset(job.output_prefix)
    writer = None
    try:
        with _encoded_batches(encoder, job) as batches, \
                tqdm(disable=not job.progress or None, unit=" conv", dynamic_ncols=True) as bar:
            started = time.perf_counter()
            for batch in batches:
                if writer is None:  # megatron-core is imported only once the workers are busy
                    from megatron_qwen.data.writer import DatasetWriter
                    writer = DatasetWriter(staging, job.inputs)
                if batch.rejects:
                    if job.on_error == "fail":
                        first = batch.rejects[0]
                        raise InputError(f"{job.inputs[first.source]}:{first.line}: {first.reason}")
                    writer.add_rejects(batch)
                writer.add(batch)
                stats.add(batch)
                bar.update(batch.rows)
                bar.set_postfix_str(f"{stats.tokens / max(time.perf_counter() - started, 1e-9) / 1e6:.2f}M tok/s",
                                    refresh=False)
        if writer is None:
            from megatron_qwen.data.writer import DatasetWriter
            writer = DatasetWriter(staging, job.inputs)
        writer.finalize()
        result = {"format": STATS_FORMAT, **stats.to_dict(), "provenance": provenance(tokenizer, job.settings),
                  "inputs": [str(p) for p in job.inputs]}
        return staging.commit(result)
    finally:
        if writer is not None:
            writer.close()
        staging.discard()


def provenance(tokenizer, settings: EncodeSettings) -> dict:
    """What the trainer checks before using a dataset with a model and a configuration."""
    return {"tokenizer": tokenizer.provenance(), "loss_mask": settings.loss_mask,
            "seq_length": settings.seq_length, "system_prompt": settings.system_prompt,
            "overlong": settings.overlong}


class _encoded_batches:
    """Context manager yielding encoded batches in input order, from a pool of ``workers`` processes
    (or in this process for one worker)."""

    def __init__(self, encoder: ConversationEncoder, job: PreprocessJob):
        self.encoder, self.job, self.workers = encoder, job, job.workers
        self.pool = None

    def __enter__(self) -> Iterator[EncodedBatch]:
        rows = read_batches(self.job.inputs, self.job.batch_bytes)
        if self.workers == 1:
            return map(self.encoder.encode_batch, rows)
        # fork: workers inherit the loaded tokenizer instead of loading it again.
        context = multiprocessing.get_context("fork")
        self.pool = context.Pool(self.workers, initializer=_set_worker_encoder, initargs=(self.encoder,))
        return self._ordered(rows)

    def _ordered(self, rows) -> Iterator[EncodedBatch]:
        window = collections.deque()
        for batch in rows:
            window.append(self.pool.apply_async(_encode_in_worker, (batch,)))
            if len(window) >= 4 * self.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


_worker_encoder: ConversationEncoder | None = None


def _set_worker_encoder(encoder: ConversationEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(rows) -> EncodedBatch:
    return _worker_encoder.encode_batch(rows)
