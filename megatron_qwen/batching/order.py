"""Which conversation comes next: the train/validation split, per-epoch shuffling and weighted blending.

- Split: per dataset, a fixed permutation (seeded by ``SPLIT_SEED`` and the dataset's size only, so the
  validation set does not move when the run's seed changes) puts ``round(valid_fraction * n)`` conversations
  (at least one when the fraction is positive) in validation and the rest in training. A validation pass
  may use a fixed sample of them (``validation_sample``: the same one at every evaluation, and a uniform
  one, so blended datasets keep their shares).
- Shuffling: the training conversations of dataset ``d`` are visited in epoch ``e`` in the order of
  ``numpy.random.default_rng([seed, d, e]).permutation``: deterministic per seed, different per epoch, and
  an epoch ends only when every training conversation of that dataset was drawn once.
- Blending (megatron's greedy rule): draw ``j`` (0-based) comes from the dataset ``d`` whose deficit
  ``weight[d] * (j + 1) - drawn[d]`` is largest (ties to the lower index), so after any number ``N`` of
  draws ``drawn[d]`` stays within one draw of ``weight[d] * N`` for every ``d``; each dataset cycles through
  its own epochs at its own pace. Weights default to the datasets' training sizes, i.e. plain concatenation.

The whole position of the stream is ``drawn`` (one count per dataset): saving and restoring it resumes the
same sequence of conversations bit-exactly.
"""
from __future__ import annotations

import numpy as np

SPLIT_SEED = 20231003


def split_conversations(num_conversations: int, valid_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, validation ids), each sorted, for a dataset of ``num_conversations``."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    num_valid = int(np.floor(valid_fraction * num_conversations + 0.5))
    if valid_fraction > 0:
        num_valid = max(1, num_valid)
    if num_valid >= num_conversations:
        raise ValueError(
            f"{where}: {num_conversations} conversation(s) leave none for training with valid_fraction {valid_fraction}"
        )
    order = np.random.default_rng([SPLIT_SEED, num_conversations]).permutation(num_conversations)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


def validation_sample(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items`` (all when ``limit`` is None), a uniform sample fixed by ``SPLIT_SEED`` and
    the number of items, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    chosen = np.sort(np.random.default_rng([SPLIT_SEED, len(items)]).permutation(len(items))[:limit])
    return [items[index] for index in chosen]


def normalized_weights(weights: list[float] | None, sizes: list[int]) -> np.ndarray:
    raw = np.asarray(sizes if weights is None else weights, dtype=np.float64)
    if len(raw) != len(sizes):
        raise ValueError(f"{len(raw)} blending weight(s) for {len(sizes)} dataset(s)")
    if np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError(f"blending weights must be non-negative with a positive sum, got {list(raw)}")
    return raw / raw.sum()


class ConversationSampler:
    """An endless, deterministic stream of ``(dataset index, conversation id)`` over the training splits."""

    def __init__(self, train_ids: list[np.ndarray], weights: np.ndarray, seed: int):
        self.train_ids = train_ids
        # Python floats: the same IEEE arithmetic as numpy's, without its per-call cost on a few elements
        self.weights = [float(weight) for weight in weights]
        self.seed = seed
        self.drawn = [0] * len(train_ids)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._next: tuple[int, int] | None = None  # peek's answer until the next take

    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(dataset)
        if cached is None or cached[0] != epoch:
            ids = self.train_ids[dataset]
            cached = (epoch, ids[np.random.default_rng([self.seed, dataset, epoch]).permutation(len(ids))])
            self._orders[dataset] = cached
        return cached[1]

    def _next_dataset(self) -> int:
        total = sum(self.drawn) + 1
        deficits = [weight * total - drawn for weight, drawn in zip(self.weights, self.drawn)]
        return deficits.index(max(deficits))  # the first of equal maxima, as numpy's argmax

    def peek(self) -> tuple[int, int]:
        """The next ``(dataset, conversation id)`` without consuming it."""
        if self._next is None:
            dataset = self._next_dataset()
            epoch, index = divmod(self.drawn[dataset], len(self.train_ids[dataset]))
            self._next = dataset, int(self._order(dataset, epoch)[index])
        return self._next

    def take(self) -> tuple[int, int]:
        item = self.peek()
        self.drawn[item[0]] += 1
        self._next = None
        return item

    def epochs(self) -> list[float]:
        """Fractional epochs completed per dataset, for logging."""
        return [drawn / len(ids) for drawn, ids in zip(self.drawn, self.train_ids)]

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        drawn = [int(count) for count in state["drawn"]]
        if len(drawn) != len(self.train_ids):
            raise ValueError(f"data position is for {len(drawn)} dataset(s), this run has {len(self.train_ids)}")
        self.drawn = drawn
        self._next = None
