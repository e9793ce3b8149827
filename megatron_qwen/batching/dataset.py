"""One SFT dataset on disk: the pair of megatron-core indexed datasets that the data tool writes per PREFIX.

``PREFIX_text_document`` holds the token ids and ``PREFIX_loss_mask_document`` one mask byte per token, one
document (= one sequence) per conversation. ``mask[i] == 1`` means token ``i`` is a target, i.e. predicted from
the tokens before it, so a conversation of ``n`` tokens gives ``n - 1`` model positions with
``input = tokens[:-1]``, ``labels = tokens[1:]``, ``loss_mask = mask[1:]``.
"""
from __future__ import annotations


import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.data.dataset_files import loss_mask_prefix, text_prefix
from megatron_qwen.data.writer import check_indexes


class ConversationDataset:
    """Random access to the conversations of one PREFIX, with their lengths in tokens."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        for path_prefix in (text_prefix(prefix), loss_mask_prefix(prefix)):
            if not IndexedDataset.exists(path_prefix):
                raise FileNotFoundError(
                    f"dataset {prefix!r}: {path_prefix}.bin/.idx not found "
                    "(write it with tools/preprocess_chatml.py --output-prefix PREFIX)"
                )
        check_indexes(prefix)
        self.text = IndexedDataset(text_prefix(prefix))
        self.loss_mask = IndexedDataset(loss_mask_prefix(prefix))
        self.lengths = np.asarray(self.text.sequence_lengths, dtype=np.int64)
        self._check_layout()

    def _check_layout(self) -> None:
        mask_lengths = np.asarray(self.loss_mask.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, mask_lengths):
            raise ValueError(
                f"dataset {self.prefix!r}: {text_prefix(self.prefix)} and {loss_mask_prefix(self.prefix)} "
                "hold different conversation lengths; rebuild the dataset"
            )
        if len(self.text.document_indices) != len(self.lengths) + 1:
            raise ValueError(
                f"dataset {self.prefix!r}: {text_prefix(self.prefix)} does not hold one sequence per document "
                "(one conversation per document is expected)"
            )
        if len(self.lengths) == 0:
            raise ValueError(f"dataset {self.prefix!r}: no conversations")

    def __len__(self) -> int:
        return len(self.lengths)

    def num_positions(self, index: int) -> int:
        """Model positions of conversation ``index``: its tokens minus one (the last token is only a label)."""
        return int(self.lengths[index]) - 1

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and target mask (uint8) of conversation ``index``."""
        return (
            np.asarray(self.text[int(index)], dtype=np.int64),
            np.asarray(self.loss_mask[int(index)], dtype=np.uint8),
        )
