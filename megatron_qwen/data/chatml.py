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
"""
from __future__ import annotations

from array import array
from functools import lru_cache
from typing import Iterable, NamedTuple, Sequence

import numpy as np

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
_ROLE_INDEX = {role: index for index, role in enumerate(ROLES)}

# Which of a turn's six pieces are targets: (<|im_start|>, role, "\n", content, <|im_end|>, "\n").
_NOTHING = (0, 0, 0, 0, 0, 0)
_MASK_PIECES = {
    "assistant": {"assistant": (0, 0, 0, 1, 1, 0)},
    "qwen-finetune": {"assistant": (1, 0, 0, 1, 1, 1), "system": (1, 0, 0, 0, 1, 1), "user": (1, 0, 0, 0, 1, 1)},
    "assistant-with-header": {"assistant": (0, 1, 1, 1, 1, 0)},
}
LOSS_MASK_CONVENTIONS = tuple(_MASK_PIECES)
_CONTENT = 3  # index of the content among the six pieces


class Message(NamedTuple):
    role: str  # one of ROLES
    content: str


class TokenizedConversation(NamedTuple):
    """A conversation's turns as parallel lists; the ChatML frame around each content is the renderer's."""
    roles: list[int]  # indices into ROLES
    contents: list[memoryview]  # each turn's content ids (uint32)

    def head(self, turns: int) -> TokenizedConversation:
        return TokenizedConversation(self.roles[:turns], self.contents[:turns])


def with_system_prompt(messages: Sequence[Message], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[Message]:
    """The conversation as rendered: a system turn with ``system_prompt`` is put first when the
    conversation has none (an empty prompt adds nothing)."""
    if (messages and messages[0][0] == "system") or not system_prompt:
        return list(messages)
    return [Message("system", system_prompt), *messages]


def render_text(messages: Iterable[Message]) -> str:
    """The ChatML text of a conversation, exactly what ``ChatMLRenderer.render`` tokenizes."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)


class ChatMLRenderer:
    """Renders messages with one tokenizer and one loss-mask convention.

    Work is split so a batch of many conversations pays per-token costs only in C: ``tokenize`` encodes
    contents to id buffers, ``frame`` lays out the ChatML pieces around them (to be joined as bytes),
    and ``mask`` builds the loss mask of any number of turns at once from roles and content lengths."""

    def __init__(self, tokenizer, convention: str = "assistant"):
        if convention not in _MASK_PIECES:
            raise ValueError(f"unknown loss-mask convention {convention!r} "
                             f"(choose from {', '.join(LOSS_MASK_CONVENTIONS)})")
        self.tokenizer = tokenizer
        self.convention = convention
        newline = tokenizer.encode("\n")
        role_ids = [tokenizer.encode(role) for role in ROLES]
        self._heads = [_id_buffer([tokenizer.im_start_id, *ids, *newline]) for ids in role_ids]
        self._tail = _id_buffer([tokenizer.im_end_id, *newline])
        self._frame_lengths = [len(head) + len(self._tail) for head in self._heads]
        # Per role: the six pieces' lengths (the content's filled in per turn) and targets.
        self._piece_lengths = np.array([[1, len(ids), len(newline), 0, 1, len(newline)] for ids in role_ids],
                                       dtype=np.int64)
        self._piece_targets = np.array([_MASK_PIECES[convention].get(role, _NOTHING) for role in ROLES],
                                       dtype=np.uint8)
        # System prompts repeat across a dataset (the default one is added to most conversations).
        self._encode_system = lru_cache(maxsize=64)(tokenizer.encode_ids)

    def tokenize(self, messages: Iterable[Message]) -> TokenizedConversation:
        encode, encode_system = self.tokenizer.encode_ids, self._encode_system
        roles = [_ROLE_INDEX[role] for role, _ in messages]
        contents = [encode_system(content) if role == "system" else encode(content) for role, content in messages]
        return TokenizedConversation(roles, contents)

    def turn_lengths(self, conversation: TokenizedConversation) -> list[int]:
        frame_lengths = self._frame_lengths
        return [frame_lengths[role] + len(content) for role, content in zip(*conversation)]

    def frame(self, parts: list, conversation: TokenizedConversation) -> None:
        """Append the id buffers of the conversation in ChatML order to ``parts`` (``b"".join`` them)."""
        heads, tail = self._heads, self._tail
        for role, content in zip(*conversation):
            parts += (heads[role], content, tail)

    def mask(self, roles: Sequence[int], content_lengths: Sequence[int]) -> np.ndarray:
        """The loss mask (uint8) of consecutive turns given their roles and content lengths."""
        roles = np.asarray(roles, dtype=np.int64)
        lengths = self._piece_lengths[roles]
        lengths[:, _CONTENT] = content_lengths
        return np.repeat(self._piece_targets[roles].ravel(), lengths.ravel())

    def render(self, messages: Iterable[Message]) -> tuple[list[int], list[int]]:
        """Token ids and loss mask of a whole conversation (already carrying its system turn)."""
        conversation = self.tokenize(messages)
        parts: list = []
        self.frame(parts, conversation)
        mask = self.mask(conversation.roles, [len(c) for c in conversation.contents])
        return ids_from_parts(parts).tolist(), mask.tolist()


def _id_buffer(ids: list[int]) -> memoryview:
    return memoryview(array("I", ids))


def ids_from_parts(parts: list) -> np.ndarray:
    """The int32 ids of joined id buffers (Qwen ids are far below 2**31, so uint32 bytes are int32)."""
    return np.frombuffer(b"".join(parts), dtype=np.uint32).view(np.int32)


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
