"""Reads a preprocessed dataset back and shows a conversation with its supervised tokens marked.

The quickest check that a loss mask is right: supervised spans are coloured on a terminal and put
between ``[[`` and ``]]`` otherwise.
"""
from __future__ import annotations

import itertools

import numpy as np

from megatron_qwen.data.dataset_files import indexed_dataset_module, loss_mask_prefix, read_stats, text_prefix
from megatron_qwen.data.writer import check_indexes

SUPERVISED_COLOUR, RESET = "\033[1;32m", "\033[0m"
OPEN_MARK, CLOSE_MARK = "[[", "]]"


def open_dataset(prefix):
    """The (token ids, loss mask) IndexedDatasets of a complete dataset, and its stats."""
    stats = read_stats(prefix)
    check_indexes(prefix)
    IndexedDataset = indexed_dataset_module().IndexedDataset
    return IndexedDataset(text_prefix(prefix)), IndexedDataset(loss_mask_prefix(prefix)), stats


def marked_text(tokenizer, ids: np.ndarray, mask: np.ndarray, colour: bool) -> str:
    """The decoded conversation with each run of supervised tokens marked."""
    pieces = []
    position = 0
    for target, run in itertools.groupby(mask.tolist()):
        length = len(list(run))
        text = tokenizer.decode(ids[position:position + length])
        position += length
        if target:
            text = f"{SUPERVISED_COLOUR}{text}{RESET}" if colour else f"{OPEN_MARK}{text}{CLOSE_MARK}"
        pieces.append(text)
    return "".join(pieces)
