"""Each update's batch of a run: datasets, split, sampler and row filling behind one object, built from the run's
data and training settings.

Every rank builds the same global batch plan (row contents are decided from the index lengths alone, which is
cheap) and collates only the conversations of its own rows: data-parallel rank ``r`` of ``D`` takes the ``r``-th
contiguous ``rows / D`` rows, cut into micro-batches of ``micro_batch_size`` rows (``UpdateBatch``).

A global batch consumes a prefix of the sampler's stream (``rows.next_rows``: with ``--rows pack`` the
conversation that fits in no row is left for the next batch), so the data position (``state_dict``) is the
sampler's per-dataset draw counts after the last global batch plus a fingerprint of everything that decides
the stream; restoring it in a run with the same data settings reproduces the following batches exactly, and
restoring it into different settings is refused.

Validation runs on named sets, each reported as a loss of its own: ``HELD_OUT``, the conversations split off the
training datasets (``valid_fraction``; one set per dataset when they are blended), and each validation-only
dataset (``valid_data_path``), whole or a fixed sample of ``eval_conversations``. Validation-only datasets never
enter the stream or its fingerprint, so a run may add or drop them at a resume.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from megatron_qwen.batching.checks import check_datasets, recorded_chat_settings, rendering_differences
from megatron_qwen.batching.dataset import ConversationDataset
from megatron_qwen.batching.order import (ConversationSampler, normalized_weights, split_conversations,
                                          validation_sample)
from megatron_qwen.batching.rows import (ROW_MODES, MicroBatch, Row, ScheduleShape, batches_from_list, collate,
                                         next_rows, schedule_shape)
from megatron_qwen.config import DataSettings, TrainingSettings


def ceil_product(factor: float, count: int) -> int:
    """``ceil(factor x count)`` of the decimal product: 0.1 x 30 is 3, not the 4 its binary floats round up to."""
    return math.ceil(round(factor * count, 9))


HELD_OUT = "held-out"  # the validation set of conversations split off the training datasets


def dataset_names(prefixes: list[str]) -> list[str]:
    """What the log calls each dataset of a list (``--data-path``, ``--valid-data-path``): its file name, or the
    whole PREFIX where that is ambiguous."""
    names = [Path(prefix).name for prefix in prefixes]
    return [
        name if names.count(name) == 1 and name != HELD_OUT else prefix for name, prefix in zip(names, prefixes)
    ]


def _held_out_sets(items: list[tuple[int, int]], prefixes: list[str]) -> dict[str, list[tuple[int, int]]]:
    """The held-out conversations as one set, or, for blended datasets, one set per dataset (``held-out/NAME``),
    whose token-weighted losses make the held-out loss."""
    if not items:
        return {}
    if len(prefixes) == 1:
        return {HELD_OUT: items}
    parts = {f"{HELD_OUT}/{name}": [item for item in items if item[0] == index]
             for index, name in enumerate(dataset_names(prefixes))}
    return {name: part for name, part in parts.items() if part}


@dataclasses.dataclass
class UpdateBatch:
    """One update's global batch as this rank sees it."""

    rows: list[Row]  # every row of the global batch (the same plan on every rank)
    micro_batches: list[MicroBatch]  # this data-parallel rank's share, collated
    counts: dict[str, int]  # the global batch's non-padding positions, conversations and rows (host-known)


@dataclasses.dataclass(frozen=True)
class DataParallelShare:
    """Which rows of a global batch this rank collates: the ``rank``-th of ``size`` equal shares; ``row_multiple``
    is what an update's row count must be a multiple of (``RunConfig.row_multiple``)."""

    rank: int = 0
    size: int = 1
    row_multiple: int = 1


class BatchSource:
    def __init__(self, data: DataSettings, training: TrainingSettings, share: DataParallelShare = DataParallelShare()):
        if data.rows not in ROW_MODES:
            raise ValueError(f"--rows must be one of {ROW_MODES}, got {data.rows!r}")
        if not data.data_path:
            raise ValueError("no dataset given (--data-path PREFIX [PREFIX ...])")
        self.row_mode, self.seq_length, self.pad_token_id = data.rows, data.seq_length, data.pad_token_id
        self.global_batch_size, self.micro_batch_size = training.global_batch_size, training.micro_batch_size
        self.share = share
        self.shape: ScheduleShape = schedule_shape(data.rows, data.seq_length, training.micro_batch_size)
        prefixes = list(data.data_path)
        # training datasets first; a row's (dataset, conversation) indexes this list whatever set it comes from
        training_sets = [ConversationDataset(prefix) for prefix in prefixes]
        self.datasets = training_sets + [ConversationDataset(prefix) for prefix in data.valid_data_path]
        splits = [split_conversations(len(dataset), data.valid_fraction, dataset.prefix) for dataset in training_sets]
        self.train_ids = [train for train, _ in splits]
        held_out = [(index, int(conversation)) for index, (_, valid) in enumerate(splits) for conversation in valid]
        self.num_held_out = len(held_out)
        self.valid_items = validation_sample(held_out, training.eval_conversations)
        self.held_out_sets = _held_out_sets(self.valid_items, prefixes)
        self.valid_sets = dict(self.held_out_sets)
        for index, name in enumerate(dataset_names(list(data.valid_data_path)), start=len(prefixes)):
            if name in self.valid_sets:
                raise ValueError(f"--valid-data-path: a validation set is already called {name!r}; rename {name}")
            conversations = [(index, conversation) for conversation in range(len(self.datasets[index]))]
            self.valid_sets[name] = validation_sample(conversations, training.eval_conversations)
        self.weights = normalized_weights(data.data_weights, [len(train) for train in self.train_ids])
        self.sampler = ConversationSampler(self.train_ids, self.weights, training.seed)
        self.global_batches = 0
        self.fingerprint = {
            "prefixes": prefixes,
            "sizes": [len(dataset) for dataset in training_sets],
            "weights": [float(weight) for weight in self.weights],
            "valid_fraction": data.valid_fraction,
            # "mode" is the saved name of --rows; padfree takes pad's conversations update by update, so a run may
            # switch between the two
            "mode": "pad" if data.rows == "padfree" else data.rows,
            "seq_length": data.seq_length,
            "seed": training.seed,
        }

    def training_datasets(self) -> list[ConversationDataset]:
        return self.datasets[: len(self.train_ids)]

    def validation_only_datasets(self) -> list[ConversationDataset]:
        return self.datasets[len(self.train_ids) :]

    def check(self, tokenizer_sha256: str | None, embedding_rows: int) -> list[str]:
        """Stops with a message naming the file or flag when a dataset or the batch size does not fit the run (see
        ``checks``; a collective under torch.distributed); returns warnings (datasets whose files cannot be
        verified)."""
        warnings = check_datasets(self.datasets, tokenizer_sha256, embedding_rows, self.seq_length)
        if self.pad_token_id >= embedding_rows:
            raise ValueError(
                f"pad_token_id {self.pad_token_id} has no row in the model's embedding ({embedding_rows} rows)"
            )
        # an update draws global_batch_size conversations (pad, padfree) or rows of one or more (pack): more than the
        # training conversations would repeat conversations within an update
        conversations = self.num_train_conversations()
        if self.global_batch_size > conversations:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size}: one update would draw more than the {conversations} "
                "training conversations (an epoch)"
            )
        return warnings

    def rendering_warnings(self) -> list[str]:
        """One line per validation-only dataset rendered unlike the training data: its loss then measures other
        targets or contexts than the training loss does, which the user should know when comparing them."""
        training, valid_only = self.training_datasets(), self.validation_only_datasets()
        names = dataset_names([dataset.prefix for dataset in valid_only])
        return [
            f"validation set {name} was rendered unlike the training data: {'; '.join(differences)}"
            for name, differences in zip(names, rendering_differences(training, valid_only))
            if differences
        ]

    def chat_settings(self) -> dict | None:
        """What the datasets were rendered with, for the exported chat template (``checks``)."""
        return recorded_chat_settings(self.training_datasets())

    def next_update(self) -> UpdateBatch:
        """The next update's batch (advances the data position)."""
        rows = self.next_rows(self.global_batch_size, self.share.row_multiple)
        return UpdateBatch(rows, self.rank_micro_batches(rows), self.counts(rows))

    def next_rows(self, count: int, row_multiple: int = 1) -> list[Row]:
        """The rows of the next global batch (advances the data position): ``count`` rows (``pad``, ``pack``) or
        the rows of ``count`` conversations (``padfree``, a multiple of ``row_multiple``)."""
        rows = next_rows(self.row_mode, count, self.sampler.peek, self.sampler.take, self.datasets, self.seq_length,
                         row_multiple)
        self.global_batches += 1
        return rows

    def counts(self, rows: list[Row]) -> dict[str, int]:
        """Non-padding positions, conversations and rows of a whole global batch, from the index lengths: known
        on every rank without collating or a device round trip."""
        items = [item for row in rows for item in row]
        return {
            "tokens": sum(self.datasets[dataset].num_positions(conversation) for dataset, conversation in items),
            "conversations": len(items),
            "rows": len(rows),
        }

    def validation_rows(self) -> dict[str, list[list[Row]]]:
        """Per validation set (the held-out ones first), global batches holding every conversation of its sample
        once, in fixed order, filled like training batches; all-padding rows (the last batch's unused ones,
        ``padfree``'s rounding) carry no supervised token and so leave the token-weighted loss unchanged."""
        return {
            name: batches_from_list(self.row_mode, items, self.global_batch_size, self.datasets, self.seq_length,
                                    self.share.row_multiple)
            for name, items in self.valid_sets.items()
        }

    def validation_batches(self) -> dict[str, list[list[MicroBatch]]]:
        """``validation_rows``, as this rank's micro-batches of each global batch."""
        return {
            name: [self.rank_micro_batches(rows) for rows in batches]
            for name, batches in self.validation_rows().items()
        }

    def rank_micro_batches(self, rows: list[Row]) -> list[MicroBatch]:
        """This data-parallel rank's micro-batches of a global batch."""
        share, size = self.share, self.micro_batch_size
        if len(rows) % (share.size * size):
            raise ValueError(
                f"global batch of {len(rows)} rows is not a multiple of data-parallel size {share.size} "
                f"x micro-batch size {size}"
            )
        per_rank = len(rows) // share.size
        mine = rows[share.rank * per_rank : (share.rank + 1) * per_rank]
        return [self.collate(mine[start : start + size]) for start in range(0, per_rank, size)]

    def collate(self, rows: list[Row]) -> MicroBatch:
        """One micro-batch of ``rows`` in this run's layout."""
        return collate(self.row_mode, rows, self.datasets, self.seq_length, self.pad_token_id)

    def epochs(self) -> list[float]:
        """Passes over each dataset's training conversations so far."""
        return self.sampler.epochs()

    def num_train_conversations(self) -> int:
        return sum(len(ids) for ids in self.train_ids)

    def updates_for_epochs(self, epochs: float) -> int:
        """The fewest updates from the start of the stream that draw ``epochs`` x the training conversations (with
        the default blending weights, by size, that many epochs of every dataset).
        ``pad`` and ``padfree`` draw ``global_batch_size`` per update; ``pack`` draws what its rows hold, so the
        packing of a fresh stream is planned (index lengths only, the same plan every rank and every resume makes)."""
        if epochs <= 0:
            raise ValueError(f"epochs must be above 0, got {epochs}")
        conversations = ceil_product(epochs, self.num_train_conversations())
        if self.row_mode != "pack":
            return math.ceil(conversations / self.global_batch_size)
        stream = ConversationSampler(self.train_ids, self.weights, self.sampler.seed)
        updates = 0
        while sum(stream.drawn) < conversations:
            next_rows(self.row_mode, self.global_batch_size, stream.peek, stream.take, self.datasets, self.seq_length)
            updates += 1
        return updates

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "global_batches": self.global_batches, **self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["fingerprint"]
        differing = sorted(key for key in self.fingerprint if saved.get(key) != self.fingerprint[key])
        if differing:
            details = "; ".join(f"{key}: saved {saved.get(key)!r}, now {self.fingerprint[key]!r}" for key in differing)
            raise ValueError(f"cannot resume the data position: the data settings changed ({details})")
        self.sampler.load_state_dict(state)
        self.global_batches = int(state["global_batches"])
