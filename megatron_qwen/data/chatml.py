"""Qwen's ChatML: renders a conversation to token ids and a loss mask, one turn at a time.

A turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, and each of its six pieces is tokenized on
its own (as Qwen's own code does), so content never merges with the header or the closing token and
an assistant reply always starts at a token boundary.

``mask[i]`` says whether token ``i`` is a target (the model is trained to predict it from the tokens
before it); a trainer uses ``labels = tokens[1:]`` and ``loss_mask = mask[1:]``. The conventions:

* ``assistant`` (default): each assistant reply's content and the ``<|im_end|>`` closing it.
* ``qwen-finetune``: the targets of Qwen's published finetune script: every turn's ``<|im_start|>``,
  ``<|im_end|>`` and the ``\\n`` after it, plus the assistant's content.
* ``assistant-with-header``: ``assistant`` plus the ``assistant\\n`` after ``<|im_start|>``.

An ``assistant_history`` turn is an assistant reply given as context only (``reasoning_history``): it
renders as an ``assistant`` turn and is never a target, its frame counting as a user turn's.
"""
from __future__ import annotations

from array import array
from functools import lru_cache
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from megatron_qwen.data.tokenizer import ID_BYTES, Buffer
from megatron_qwen.data.tool_calls import with_tools

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "assistant_history")
_ROLE_INDEX = {role: index for index, role in enumerate(ROLES)}
_HEADER = {**{role: role for role in ROLES}, "assistant_history": "assistant"}  # the role a turn's header names

# Which of a turn's six pieces are targets: (<|im_start|>, role, "\n", content, <|im_end|>, "\n").
_NOTHING = (0, 0, 0, 0, 0, 0)
_MASK_PIECES = {
    "assistant": {"assistant": (0, 0, 0, 1, 1, 0)},
    "qwen-finetune": {"assistant": (1, 0, 0, 1, 1, 1), "system": (1, 0, 0, 0, 1, 1), "user": (1, 0, 0, 0, 1, 1),
                      "assistant_history": (1, 0, 0, 0, 1, 1)},
    "assistant-with-header": {"assistant": (0, 1, 1, 1, 1, 0)},
}
LOSS_MASK_CONVENTIONS = tuple(_MASK_PIECES)
_CONTENT = 3  # index of the content among the six pieces


class Message(NamedTuple):
    role: str  # one of ROLES
    content: str


def with_system_prompt(messages: Sequence[Message], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                       tools: str = "") -> list[Message]:
    """The conversation as rendered: a system turn with ``system_prompt`` is put first when the
    conversation has none (an empty prompt adds nothing), and the tools block offered to the model
    (``tool_calls.tools_block``) is appended to the system turn."""
    has_system = bool(messages) and messages[0][0] == "system"
    if not tools and (has_system or not system_prompt):
        return list(messages)
    system = with_tools(messages[0][1] if has_system else system_prompt, tools)
    return [Message("system", system), *messages[has_system:]]


def render_text(messages: Iterable[Message]) -> str:
    """The ChatML text of a conversation, exactly what ``ChatMLRenderer.render`` tokenizes."""
    return "".join(f"<|im_start|>{_HEADER[role]}\n{content}<|im_end|>\n" for role, content in messages)


class ChatMLRenderer:
    """Renders messages with one tokenizer and one loss-mask convention.

    Work is split so a batch of many conversations pays per-token costs only in C: ``tokenize`` encodes
    the contents of each turn to an id buffer, and ``ids`` and ``mask`` then lay out the ChatML pieces
    and the loss mask of any number of consecutive turns at once, from their roles and contents."""

    def __init__(self, tokenizer, convention: str = "assistant"):
        if convention not in _MASK_PIECES:
            raise ValueError(f"unknown loss-mask convention {convention!r} "
                             f"(choose from {', '.join(LOSS_MASK_CONVENTIONS)})")
        self.tokenizer = tokenizer
        self.convention = convention
        newline = tokenizer.encode("\n")
        role_ids = [tokenizer.encode(_HEADER[role]) for role in ROLES]
        self._heads = [_id_buffer([tokenizer.im_start_id, *ids, *newline]) for ids in role_ids]
        self._tail = _id_buffer([tokenizer.im_end_id, *newline])
        # Per role: the six pieces' lengths (the content's filled in per turn) and targets.
        self._piece_lengths = np.array([[1, len(ids), len(newline), 0, 1, len(newline)] for ids in role_ids],
                                       dtype=np.int64)
        self._piece_targets = np.array([_MASK_PIECES[convention].get(role, _NOTHING) for role in ROLES],
                                       dtype=np.uint8)
        self.frame_lengths = self._piece_lengths.sum(axis=1)  # tokens of a turn besides its content, per role
        # System prompts repeat across a dataset (the default one is added to most conversations).
        self._encode_system = lru_cache(maxsize=64)(tokenizer.encode_ids)

    def tokenize(self, messages: Sequence[Message], roles: list[int], contents: list[Buffer]) -> int:
        """Append each message's role (an index into ROLES) to ``roles`` and its content ids to
        ``contents``; returns the number of turns appended."""
        encode, encode_system = self.tokenizer.encode_ids, self._encode_system
        roles += [_ROLE_INDEX[role] for role, _ in messages]
        contents += [encode_system(content) if role == "system" else encode(content) for role, content in messages]
        return len(messages)

    @staticmethod
    def content_lengths(contents: Sequence[Buffer]) -> np.ndarray:
        """The number of ids (int64) of each content."""
        return np.array([memoryview(content).nbytes for content in contents], dtype=np.int64) // ID_BYTES

    def ids(self, roles: Sequence[int], contents: Sequence[Buffer]) -> np.ndarray:
        """The token ids (int32) of consecutive turns: each content inside its ChatML frame."""
        heads, tail = self._heads, self._tail
        # Qwen ids are far below 2**31, so the joined uint32 buffers are int32 ids as they stand.
        return np.frombuffer(b"".join([piece for role, content in zip(roles, contents)
                                       for piece in (heads[role], content, tail)]), dtype=np.int32)

    def mask(self, roles: Sequence[int], content_lengths: Sequence[int]) -> np.ndarray:
        """The loss mask (uint8) of consecutive turns given their roles and content lengths."""
        roles = np.asarray(roles, dtype=np.int64)
        lengths = self._piece_lengths[roles]
        lengths[:, _CONTENT] = content_lengths
        return np.repeat(self._piece_targets[roles].ravel(), lengths.ravel())

    def render(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Token ids and loss mask of a whole conversation (already carrying its system turn)."""
        roles, contents = [], []
        self.tokenize(messages, roles, contents)
        return self.ids(roles, contents).tolist(), self.mask(roles, self.content_lengths(contents)).tolist()


def _id_buffer(ids: list[int]) -> Buffer:
    return array("I", ids)


def turns_that_fit(roles: Sequence[int], lengths: Sequence[int], seq_length: int) -> int:
    """How many leading turns to keep: the longest prefix with at most ``seq_length`` tokens that ends on
    an assistant turn (so the system turn and whole exchanges from the start), or 0 if none fits."""
    assistant = ROLES.index("assistant")
    kept, total = 0, 0
    for count, (role, length) in enumerate(zip(roles, lengths), 1):
        total += length
        if total > seq_length:
            break
        if role == assistant:
            kept = count
    return kept
