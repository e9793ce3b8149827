"""What a reply's reasoning becomes once the conversation has moved on: kept (``keep``), or, as Qwen3's chat
template does at serving time, dropped (``split``).

Qwen3's template writes a reply's ``<think>`` block only while the reply follows the last user query (a
user turn that is not tool results); earlier replies are written without it. Training on a whole
multi-turn conversation with every reply's reasoning teaches the model contexts it never sees when served.
``split`` cuts a conversation after each exchange (a user query and what follows it up to the next one)
whose replies reason, and at its end when replies follow the last such cut; each cut gives one sample, the
conversation up to the cut. Its targets are the replies since the previous cut; every earlier reply is
context as the template writes it (the text after its last ``</think>``), never a target again, so each
reply is trained on once, in the form served. A conversation whose replies reason only in its last
exchange, or not at all, stays one sample as it is. Replies of weight 0 (``assistant_history`` turns from the
start) count as replies where the cuts fall, and a sample whose replies all have weight 0 is not made.
"""
from __future__ import annotations

from typing import Sequence

from megatron_qwen.data.chatml import Message
from megatron_qwen.data.tool_calls import is_responses_text

POLICIES = ("keep", "split")
DEFAULT_REASONING_HISTORY = "keep"  # also what datasets and checkpoints from before the split option mean
_THINK_END = "</think>"
_REPLIES = ("assistant", "assistant_history")


def samples(messages: Sequence[Message]) -> list[list[Message]]:
    """The samples ``split`` makes of one conversation (its system turn already in place)."""
    cuts = _sample_ends(messages)
    if len(cuts) <= 1:
        return [list(messages)]
    made, start = [], 0
    for end in cuts:
        if any(role == "assistant" for role, _ in messages[start:end]):  # else it would have nothing to learn
            made.append([_as_context(message) for message in messages[:start]] + list(messages[start:end]))
        start = end
    return made


def _sample_ends(messages: Sequence[Message]) -> list[int]:
    """Where the samples end: after each exchange (a query and what follows it up to the next one) with a
    reasoning reply, and at the end when replies follow the last of those."""
    ends, reasons, replies_since = [], False, False
    for index, (role, content) in enumerate(messages):
        if _is_query(role, content) and reasons:
            ends.append(index)
            reasons = replies_since = False
        if role in _REPLIES:
            reasons = reasons or _THINK_END in content
            replies_since = True
    if reasons or replies_since:
        ends.append(len(messages))
    return ends


def _is_query(role: str, content: str) -> bool:
    return role == "user" and not is_responses_text(content)


def _as_context(message: Message) -> Message:
    role, content = message
    if role not in _REPLIES:
        return message
    return Message("assistant_history", content.split(_THINK_END)[-1].lstrip("\n"))
