"""Writes encoded batches as two megatron-core indexed datasets (token ids and loss mask) and rejects.

A worker process writes each batch's ids and mask to a batch file in the staging folder
(``write_batch_file``), already in the datasets' binary form, and sends back only the batch's summary.
The main process appends the batch files to the two ``.bin`` files in input order with in-kernel
copies (``DatasetWriter.add``) and keeps the index: token data never passes through it, so its share
of the work stays small while the workers encode.

megatron-core is imported here, on first use, because importing it costs seconds of start-up that a
run should pay only once it has data to write (and after its worker processes have started).
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from megatron_qwen.data.dataset_files import (StagedDataset, check_index, indexed_dataset_module, loss_mask_prefix,
                                              rejects_path, text_prefix)
from megatron_qwen.data.encode import BatchSummary, EncodedBatch, Reject

TOKEN_DTYPE, MASK_DTYPE = np.dtype(np.int32), np.dtype(np.uint8)


def check_indexes(prefix: str | Path) -> None:
    """``dataset_files.check_index`` of PREFIX's two indexes, as this module writes them, before megatron-core opens
    them (it would fail on a damaged one with an assertion or a numpy error naming no file)."""
    for path_prefix, dtype in ((text_prefix(prefix), TOKEN_DTYPE), (loss_mask_prefix(prefix), MASK_DTYPE)):
        check_index(Path(f"{path_prefix}.idx"), dtype.type, dtype.itemsize)


def batch_file(folder: Path, number: int) -> Path:
    """Where the batch with this number (its position in the input) waits for the main process."""
    return folder / f"batch-{number:09d}"


def write_batch_file(folder: Path, number: int, batch: EncodedBatch) -> None:
    """The batch's ids then its mask, as the ``.bin`` files hold them (int32 and uint8)."""
    with open(batch_file(folder, number), "wb") as file:
        file.write(batch.ids)
        file.write(batch.mask)


class DatasetWriter:
    def __init__(self, staging: StagedDataset, sources: Sequence[Path]):
        IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder
        # That import leaves about a million objects (torch, megatron) for the cyclic garbage collector,
        # which would rescan them at every full collection while batches stream through; none of them
        # are garbage, so they are moved out of its sight.
        gc.freeze()

        self.staging = staging
        self.sources = sources
        self._text_path = staging.staged(text_prefix(staging.prefix))
        self._mask_path = staging.staged(loss_mask_prefix(staging.prefix))
        self._text = IndexedDatasetBuilder(f"{self._text_path}.bin", dtype=TOKEN_DTYPE.type)
        self._mask = IndexedDatasetBuilder(f"{self._mask_path}.bin", dtype=MASK_DTYPE.type)
        self._rejects = None

    def add(self, number: int, summary: BatchSummary) -> None:
        """Append batch file ``number`` (then remove it): one document per conversation in each dataset,
        with identical lengths."""
        path = batch_file(self.staging.folder, number)
        tokens = int(summary.lengths.sum())
        with open(path, "rb") as source:
            _append(source, 0, tokens * TOKEN_DTYPE.itemsize, self._text.data_file)
            _append(source, tokens * TOKEN_DTYPE.itemsize, tokens * MASK_DTYPE.itemsize, self._mask.data_file)
        path.unlink()
        # The builders' data files only ever receive these copies; their indexes get what add_document
        # would have recorded for one document per conversation.
        lengths = summary.lengths.tolist()
        for builder in (self._text, self._mask):
            first = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(lengths)
            builder.document_indices.extend(range(first + 1, first + len(lengths) + 1))

    def add_rejects(self, rejects: Sequence[Reject]) -> None:
        if self._rejects is None:
            self._rejects = open(self.staging.staged(rejects_path(self.staging.prefix)), "w", encoding="utf-8")
        for reject in rejects:
            record = {"file": str(self.sources[reject.source]), "line": reject.line, "reason": reject.reason,
                      "row": reject.data.decode("utf-8", errors="replace")}
            self._rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finalize(self) -> None:
        self._text.finalize(f"{self._text_path}.idx")
        self._mask.finalize(f"{self._mask_path}.idx")

    def close(self) -> None:
        """Close every file (idempotent); after a failure the staging folder is then discarded."""
        for stream in (self._text.data_file, self._mask.data_file, self._rejects):
            if stream is not None:
                stream.close()


def _append(source: BinaryIO, offset: int, count: int, target: BinaryIO) -> None:
    """Copy ``count`` bytes of ``source`` from ``offset`` to the end of ``target``: inside the kernel with
    sendfile on Linux, through a buffer elsewhere (sendfile writes only to sockets there)."""
    try:
        while count:
            sent = os.sendfile(target.fileno(), source.fileno(), offset, count)
            if not sent:
                raise EOFError(f"{source.name} ends {count} bytes early")
            offset, count = offset + sent, count - sent
    except OSError:
        source.seek(offset)
        target.write(source.read(count))
        target.flush()
