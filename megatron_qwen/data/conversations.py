"""Parses one JSON Lines row into a conversation, in either format people have, or says what is wrong.

* OpenAI style: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}``
* ShareGPT / Qwen-finetune style: ``{"conversations": [{"from": "system"|"user"|"human"|"assistant"|"gpt",
  "value": "..."}]}``

Other keys are ignored. A row is rejected (``ConversationError`` with the reason) when it is not valid
UTF-8 or JSON, has neither list, names an unknown role, has non-string content, is empty, or has no
assistant turn.
"""
from __future__ import annotations

import json
import re

from megatron_qwen.data.chatml import Message

_FORMATS = {  # list key -> (role key, content key)
    "messages": ("role", "content"),
    "conversations": ("from", "value"),
}
_ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_SURROGATE = re.compile("[\ud800-\udfff]")


class ConversationError(ValueError):
    """A row that is not a usable conversation; the message says why."""


def parse_conversation(row: bytes) -> list[Message]:
    """The messages of one JSON Lines row (raw bytes, without the line ending), as (role, content)
    pairs (plain tuples, which are cheaper to make than ``Message``s and unpack the same way)."""
    try:
        text = row.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConversationError(f"invalid UTF-8 at byte {error.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversationError(f"malformed JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        raise ConversationError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        list_key = "messages"
    elif "conversations" in record:
        list_key = "conversations"
    else:
        raise ConversationError('missing key: expected "messages" (OpenAI style) or "conversations" (ShareGPT style)')
    items = record[list_key]
    if not isinstance(items, list):
        raise ConversationError(f'"{list_key}" is {type(items).__name__}, not a list')
    if not items:
        raise ConversationError(f'empty conversation ("{list_key}" is [])')
    messages = _messages(items, list_key)
    # Lone surrogates can only come from \u escapes; only then is the (slower) scan needed.
    if b"\\u" in row:
        _check_surrogates(messages, list_key)
    if not any(role == "assistant" for role, _ in messages):
        raise ConversationError("no assistant turn")
    return messages


def _messages(items: list, list_key: str) -> list[Message]:
    role_key, content_key = _FORMATS[list_key]
    try:  # the common case in one tight loop; any problem is diagnosed below
        messages = [(_ROLE_NAMES[item[role_key]], item[content_key]) for item in items]
        if all(type(content) is str for _, content in messages):
            return messages
    except (KeyError, TypeError):
        pass
    for number, item in enumerate(items):
        _diagnose(item, f'"{list_key}"[{number}]', role_key, content_key)
    raise AssertionError("unreachable: a message failed the fast path but passed the diagnosis")


def _diagnose(item, where: str, role_key: str, content_key: str) -> None:
    """Raise the ConversationError that says what is wrong with one message, if anything is."""
    if not isinstance(item, dict):
        raise ConversationError(f"{where} is {type(item).__name__}, not an object")
    for key in (role_key, content_key):
        if key not in item:
            raise ConversationError(f'{where} has no "{key}" key')
    role = item[role_key]
    if not isinstance(role, str) or role not in _ROLE_NAMES:
        raise ConversationError(f'{where} has unknown role {role!r} (expected one of {", ".join(_ROLE_NAMES)})')
    if not isinstance(item[content_key], str):
        raise ConversationError(f'{where} "{content_key}" is {type(item[content_key]).__name__}, not a string')


def _check_surrogates(messages: list[Message], list_key: str) -> None:
    for number, (_, content) in enumerate(messages):
        if _SURROGATE.search(content):
            raise ConversationError(f'"{list_key}"[{number}] content contains an unpaired surrogate '
                                    f'(invalid Unicode)')
