"""Writes encoded batches as two megatron-core indexed datasets (token ids and loss mask) and rejects.

megatron-core is imported here, on first use, because importing it costs seconds of start-up that a
run should pay only once it has data to write (and after its worker processes have started).
"""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_qwen.data.dataset_files import StagedDataset, loss_mask_prefix, rejects_path, text_prefix
from megatron_qwen.data.encode import EncodedBatch


class DatasetWriter:
    def __init__(self, staging: StagedDataset, sources: Sequence[Path]):
        with warnings.catch_warnings():  # its optional-dependency warnings concern training, not this
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
        # That import leaves about a million objects (torch, megatron) for the cyclic garbage collector,
        # which would rescan them at every full collection while batches stream through; none of them
        # are garbage, so they are moved out of its sight.
        gc.freeze()

        self.staging = staging
        self.sources = sources
        self._text_path = staging.staged(text_prefix(staging.prefix))
        self._mask_path = staging.staged(loss_mask_prefix(staging.prefix))
        self._text = IndexedDatasetBuilder(f"{self._text_path}.bin", dtype=np.int32)
        self._mask = IndexedDatasetBuilder(f"{self._mask_path}.bin", dtype=np.uint8)
        self._rejects = None

    def add(self, batch: EncodedBatch) -> None:
        """One document per conversation in each dataset, with identical lengths."""
        lengths = batch.lengths.tolist()
        for builder, values in ((self._text, batch.ids), (self._mask, batch.mask)):
            first = len(builder.sequence_lengths)
            # One call per batch (not per conversation) keeps this process's share of the work small;
            # add_document makes the batch a single document, so its index then gets one entry per
            # conversation, exactly what per-conversation calls would have left.
            builder.add_document(values, lengths)
            builder.document_indices[-1:] = range(first + 1, first + len(lengths) + 1)

    def add_rejects(self, batch: EncodedBatch) -> None:
        if self._rejects is None:
            self._rejects = open(self.staging.staged(rejects_path(self.staging.prefix)), "w", encoding="utf-8")
        for reject in batch.rejects:
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
