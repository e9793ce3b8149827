"""Parses one JSON Lines row into a conversation, in either format people have, or says what is wrong.

* OpenAI style: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}]}``, where an
  assistant message may carry ``"tool_calls"`` and ``"reasoning_content"`` (its ``content`` may then be null)
  and the row ``"tools"``.
* ShareGPT / Qwen-finetune style: ``{"conversations": [{"from": "system"|"user"|"human"|"assistant"|"gpt",
  "value": "..."}]}``; for function calling (as LLaMA-Factory writes it) also ``"function_call"`` turns whose
  value is the call (or a list of calls) as JSON, ``"observation"`` turns holding a result, and the row's
  ``"tools"``, often a JSON string.

Function calling becomes plain turns as ``tool_calls`` describes, and a reply's reasoning leads it as
``<think>\\nREASONING\\n</think>\\n\\n`` (as Qwen3's template writes the replies it keeps reasoning for).
An assistant message (or ``function_call`` turn) may carry ``"weight": 0`` or ``1``, as in OpenAI's finetuning
format: a reply of weight 0 stays in the conversation as context (an ``assistant_history`` turn) and is not a
target. Other keys are ignored. A row is rejected (``ConversationError`` with the reason) when it is not valid
UTF-8 or JSON, has neither list, names an unknown role, has non-string content, malformed tools, calls,
reasoning or weights, is empty, or has no assistant turn to train on.
"""
from __future__ import annotations

import re
from itertools import groupby
from typing import NamedTuple

from megatron_qwen.data.chatml import Message
from megatron_qwen.data.tool_calls import (ToolCallError, UnreadableJSON, calls_text, decode_json, read_json,
                                           responses_text, tools_block)

_FORMATS = {  # list key -> (role key, content key)
    "messages": ("role", "content"),
    "conversations": ("from", "value"),
}
_PLAIN_ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_ROLE_NAMES = {**_PLAIN_ROLE_NAMES, "tool": "tool", "observation": "tool", "function_call": "function_call"}
_REPLY_EXTRAS = ("tool_calls", "reasoning_content")  # keys of an assistant message besides its content
_SURROGATE = re.compile("[\ud800-\udfff]")


class ConversationError(ValueError):
    """A row that is not a usable conversation; the message says why."""


class Conversation(NamedTuple):
    messages: list[Message]  # roles system, user, assistant; function calling already written out
    tools: str  # the system turn's tools block (``tool_calls.tools_block``), "" when the row offers none


def parse_conversation(row: bytes) -> Conversation:
    """The conversation of one JSON Lines row (raw bytes, without the line ending); its messages are
    (role, content) pairs (plain tuples, which are cheaper to make than ``Message``s and unpack the same way)."""
    try:
        text = row.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConversationError(f"invalid UTF-8 at byte {error.start}") from None
    try:
        record = read_json(text)
    except UnreadableJSON as error:
        raise ConversationError(str(error)) from None
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
    try:
        messages = _messages(items, list_key, row)
        tools = tools_block(record["tools"]) if "tools" in record else ""
    except ToolCallError as error:
        raise ConversationError(str(error)) from None
    # Lone surrogates can only come from \u escapes; only then is the (slower) scan needed.
    if b"\\u" in row:
        _check_surrogates(messages, tools, list_key)
    if not any(role == "assistant" for role, _ in messages):
        if any(role == "assistant_history" for role, _ in messages):
            raise ConversationError('no assistant turn to train on (every one has "weight": 0)')
        raise ConversationError("no assistant turn")
    return Conversation(messages, tools)


def _messages(items: list, list_key: str, row: bytes) -> list[Message]:
    role_key, content_key = _FORMATS[list_key]
    # The common case in one tight loop; rows with tools, reasoning or weights, and bad rows, take the full path.
    if b'"tool' not in row and b'"reasoning_content"' not in row and b'"weight"' not in row:
        try:
            messages = [(_PLAIN_ROLE_NAMES[item[role_key]], item[content_key]) for item in items]
            if all(type(content) is str for _, content in messages):
                return messages
        except (KeyError, TypeError):
            pass
    messages = [_message(item, f'"{list_key}"[{number}]', role_key, content_key)
                for number, item in enumerate(items)]
    return _join_tool_results(messages)


def _message(item, where: str, role_key: str, content_key: str) -> Message:
    """One message, with any reasoning and tool calls written into its content; raises the ConversationError
    that says what is wrong with it."""
    if not isinstance(item, dict):
        raise ConversationError(f"{where} is {type(item).__name__}, not an object")
    if role_key not in item:
        raise ConversationError(f'{where} has no "{role_key}" key')
    role = item[role_key]
    if not isinstance(role, str) or role not in _ROLE_NAMES:
        raise ConversationError(f'{where} has unknown role {role!r} (expected one of {", ".join(_ROLE_NAMES)})')
    role = _ROLE_NAMES[role]
    message = _message_text(item, role, where, content_key)
    return Message("assistant_history", message.content) if _is_context_only(item, role, where) else message


def _is_context_only(item: dict, role: str, where: str) -> bool:
    """Whether the message is a reply of ``"weight": 0``. A weight other than 0 or 1, or a weight of 1 on a turn that
    is never a target, is an error; a weight of 0 on such a turn changes nothing."""
    if "weight" not in item:
        return False
    weight = item["weight"]
    if type(weight) is not int or weight not in (0, 1):
        raise ConversationError(f'{where} "weight" is {weight!r}; expected 0 or 1')
    is_reply = role in ("assistant", "function_call")
    if weight == 1 and not is_reply:
        raise ConversationError(f'{where} has "weight": 1 but is a {role} turn, which is never a target')
    return is_reply and weight == 0


def _message_text(item: dict, role: str, where: str, content_key: str) -> Message:
    if role == "function_call":  # ShareGPT: the turn's value is the call itself
        calls_where = f'{where} "{content_key}"'
        return Message("assistant", calls_text(decode_json(item.get(content_key), calls_where), calls_where))
    extras = {key: item[key] for key in _REPLY_EXTRAS if item.get(key) is not None}
    if extras and role != "assistant":
        raise ConversationError(f'{where} has "{next(iter(extras))}" but is a {role} turn')
    content = item.get(content_key)
    if content is None and extras:  # OpenAI writes a reply that only calls tools so
        content = ""
    elif content_key not in item:
        raise ConversationError(f'{where} has no "{content_key}" key')
    elif not isinstance(content, str):
        raise ConversationError(f'{where} "{content_key}" is {type(content).__name__}, not a string')
    return Message(role, _reply_text(content, extras, where) if extras else content)


def _reply_text(content: str, extras: dict, where: str) -> str:
    """An assistant reply as Qwen3's template writes it: its reasoning (in a think block) first, then its
    content, then its tool calls (on the content's next line when there is content)."""
    text = content
    if "reasoning_content" in extras:
        reasoning = extras["reasoning_content"]
        if not isinstance(reasoning, str):
            raise ConversationError(f'{where} "reasoning_content" is {type(reasoning).__name__}, not a string')
        reasoning, reply = reasoning.strip("\n"), content.lstrip("\n")
        text = f"<think>\n{reasoning}\n</think>\n\n{reply}"
    calls = calls_text(extras["tool_calls"], f'{where} "tool_calls"') if "tool_calls" in extras else ""
    if calls:
        text += ("\n" if content else "") + calls
    return text


def _join_tool_results(messages: list[Message]) -> list[Message]:
    """Consecutive tool results become one user turn, as Qwen's templates render them."""
    joined = []
    for role, group in groupby(messages, key=lambda message: message[0]):
        if role == "tool":
            joined.append(Message("user", responses_text([content for _, content in group])))
        else:
            joined += group
    return joined


def _check_surrogates(messages: list[Message], tools: str, list_key: str) -> None:
    if _SURROGATE.search(tools):
        raise ConversationError('"tools" contains an unpaired surrogate (invalid Unicode)')
    for number, (_, content) in enumerate(messages):
        if _SURROGATE.search(content):
            raise ConversationError(f'"{list_key}"[{number}] content contains an unpaired surrogate '
                                    f'(invalid Unicode)')
