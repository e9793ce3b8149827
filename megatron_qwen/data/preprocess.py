"""Runs a whole preprocessing job: read rows, encode them in worker processes, write the dataset.

Batches go to the workers, which write their data to batch files; their summaries come back in input
order through a bounded window and the batch files are appended in that order, so memory (and disk
beyond the output) stays bounded whatever the input size and the output is byte-identical for any
number of workers. With ``on_error="fail"`` the first bad row stops the run, naming its file and line,
and nothing is written under PREFIX; with ``"skip"`` bad rows go to ``PREFIX_rejects.jsonl`` with
their reasons.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing
import signal
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


from megatron_qwen.data.dataset_files import OutputError, StagedDataset, output_prefix
from megatron_qwen.data.encode import BatchSummary, ConversationEncoder, EncodeSettings, Row
from megatron_qwen.data.sources import BATCH_BYTES, InputError, read_batches
from megatron_qwen.data.stats import DatasetStats
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.data.writer import DatasetWriter, write_batch_file
from megatron_qwen.platform.log import Progress

ON_ERROR = ("fail", "skip")
STATS_FORMAT = "megatron-qwen-sft-dataset/1"


@dataclass(frozen=True)
class PreprocessJob:
    inputs: Sequence[Path]
    tokenizer: str
    output_prefix: Path  # given as a str, one ending in a path separator is refused
    settings: EncodeSettings = EncodeSettings()
    workers: int = 1
    on_error: str = "fail"
    progress: bool = True
    batch_bytes: int = BATCH_BYTES  # input bytes per unit of work sent to a worker

    def __post_init__(self):
        object.__setattr__(self, "output_prefix", output_prefix(self.output_prefix))  # a str may end in "/"
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        for path in self.inputs:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--input {path}: no such file")


def run(job: PreprocessJob) -> dict:
    """Run ``job`` and return the stats it wrote to ``PREFIX_stats.json``. Raises ``InputError`` naming the file
    (and line) of bad input, and ``OutputError`` naming PREFIX when the dataset cannot be written (a read-only or
    full disk); either way nothing is left under PREFIX."""
    tokenizer = load_tokenizer(job.tokenizer)
    encoder = ConversationEncoder(tokenizer, job.settings)
    try:
        staging = StagedDataset(job.output_prefix)
        try:
            stats = _write_staged(job, encoder, staging)
            result = {"format": STATS_FORMAT, **stats.to_dict(), "provenance": provenance(tokenizer, job.settings),
                      "inputs": [str(p) for p in job.inputs]}
            return staging.commit(result)
        finally:
            staging.discard()
    except OSError as error:  # the inputs' own errors are InputErrors: this is the output
        raise OutputError(f"--output-prefix {job.output_prefix}: cannot write the dataset ({error})") from None


def _write_staged(job: PreprocessJob, encoder: ConversationEncoder, staging: StagedDataset) -> DatasetStats:
    """Encode the inputs into ``staging``'s files; their stats."""
    stats = DatasetStats(job.settings.seq_length)
    writer = None
    try:
        with _encoded_batches(_BatchFileEncoder(encoder, staging.folder), job) as summaries, \
                Progress("preprocess", "conversations", enabled=job.progress) as progress:
            started = time.perf_counter()
            for number, summary in enumerate(summaries):
                if writer is None:  # megatron-core is imported only once the workers are busy
                    writer = DatasetWriter(staging, job.inputs)
                if summary.rejects:
                    if job.on_error == "fail":
                        first = summary.rejects[0]
                        raise InputError(f"{job.inputs[first.source]}:{first.line}: {first.reason}")
                    writer.add_rejects(summary.rejects)
                writer.add(number, summary)
                stats.add(summary)
                progress.update(summary.rows,
                                f"{stats.tokens / max(time.perf_counter() - started, 1e-9) / 1e6:.2f}M tok/s")
        if not stats.written:
            raise InputError(_nothing_written(job, stats))
        writer.finalize()
        return stats
    finally:
        if writer is not None:
            writer.close()


def _nothing_written(job: PreprocessJob, stats: DatasetStats) -> str:
    """Why a run wrote no conversation: a dataset without any would only fail later, in the trainer."""
    files = ", ".join(map(str, job.inputs))
    if not stats.read:
        return f"{files}: no conversations (empty input)"
    return (f"{files}: no conversation to write: of {stats.read} read, {stats.rejected} rejected and "
            f"{stats.dropped_overlong} dropped as longer than --seq-length {job.settings.seq_length} "
            f"(--overlong {job.settings.overlong})")


def provenance(tokenizer, settings: EncodeSettings) -> dict:
    """What the trainer checks before using a dataset with a model and a configuration."""
    return {"tokenizer": tokenizer.provenance(), "loss_mask": settings.loss_mask,
            "seq_length": settings.seq_length, "system_prompt": settings.system_prompt,
            "overlong": settings.overlong, "reasoning_history": settings.reasoning_history}


class _BatchFileEncoder:
    """Encodes a numbered batch of rows, writes its data to its batch file and returns its summary: the
    work of a worker process."""

    def __init__(self, encoder: ConversationEncoder, folder: Path):
        self.encoder, self.folder = encoder, folder

    def __call__(self, number: int, rows: list[Row]) -> BatchSummary:
        batch = self.encoder.encode_batch(rows)
        write_batch_file(self.folder, number, batch)
        return batch.summary


class _encoded_batches:
    """Context manager yielding the summaries of the encoded batches in input order (their data waits in
    batch files), from a pool of ``workers`` processes (or from this process for one worker)."""

    def __init__(self, encode: _BatchFileEncoder, job: PreprocessJob):
        self.encode, self.job, self.workers = encode, job, job.workers
        self.pool = None

    def __enter__(self) -> Iterator[BatchSummary]:
        numbered = enumerate(read_batches(self.job.inputs, self.job.batch_bytes))
        # no more processes than CPUs or batches of work: reading the first batches tells how many there are
        cpus = _usable_cpus()
        first = list(itertools.islice(numbered, min(self.job.workers, cpus)))
        self.workers = max(1, len(first))
        if self.workers < self.job.workers:
            limit = "CPUs" if self.workers == cpus else "batches of input"
            print(f"--workers {self.job.workers}: {self.workers} process(es) encode, as many as there are {limit}",
                  file=sys.stderr)
        numbered = itertools.chain(first, numbered)
        if self.workers == 1:
            return itertools.starmap(self.encode, numbered)
        # fork: workers inherit the loaded tokenizer instead of loading it again.
        context = multiprocessing.get_context("fork")
        self.pool = context.Pool(self.workers, initializer=_set_worker_encoder, initargs=(self.encode,))
        return self._ordered(numbered)

    def _ordered(self, numbered) -> Iterator[BatchSummary]:
        window = collections.deque()
        for number, rows in numbered:
            window.append(self.pool.apply_async(_encode_in_worker, (number, rows)))
            if len(window) >= 4 * self.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_worker_encode: _BatchFileEncoder | None = None


def _set_worker_encoder(encode: _BatchFileEncoder) -> None:
    global _worker_encode
    _worker_encode = encode
    # forked workers inherit the caller's handlers; a caller that records SIGTERM (a trainer in the same process)
    # would leave them deaf to the pool's terminate(), and the pool's join() waiting forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode_in_worker(number: int, rows: list[Row]) -> BatchSummary:
    return _worker_encode(number, rows)
