"""Function calling in Qwen's format: the text that tools, tool calls and tool results become.

Qwen2.5's and Qwen3's chat templates (Hermes-style function calling, which vLLM's ``hermes`` parser reads)
render function calling as plain ChatML turns, so a function-calling conversation reduces to the
``Message``s the renderer already lays out and masks:

* the offered tools: a "# Tools" block listing each tool's JSON in ``<tools></tools>``, appended to the
  system turn after a blank line (the whole system turn when the system prompt is empty);
* an assistant's calls: ``<tool_call>\\n{"name": NAME, "arguments": ARGUMENTS}\\n</tool_call>`` each, one per
  line after the reply's text (on its next line, if it has text), so they are supervised like the rest of the
  reply;
* tool results: ``<tool_response>\\nRESULT\\n</tool_response>`` each; consecutive results share one user
  turn, so they are never targets.

JSON is written as ``transformers``' chat templates write it (``json.dumps`` with ``ensure_ascii=False``),
arguments given as a string are kept as written (as Qwen3's template does; they must be JSON), and a
bare function schema in ``tools`` is wrapped as ``{"type": "function", "function": ...}``, the shape an
OpenAI-compatible server hands to the template. ``checkpoint/hf_chat.py`` renders the same at serving time.
"""
from __future__ import annotations

import json
import sys

# The wording of Qwen's function-calling prompt: a model was trained on these exact bytes.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class ToolCallError(ValueError):
    """Function-calling data that cannot be rendered; the message says where and why."""


def _to_json(value) -> str:
    """JSON as the chat templates' ``tojson`` filter writes it."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools) -> str:
    """The system turn's "# Tools" block for a row's ``tools``: a list of tool objects, or that list
    as a JSON string (ShareGPT exports store it so); "" for none (also null or an empty string)."""
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return ""
    if isinstance(tools, str):
        tools = decode_json(tools, '"tools"')
    if not isinstance(tools, list):
        raise ToolCallError(f'"tools" is {type(tools).__name__}, not a list')
    lines = []
    for number, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ToolCallError(f'"tools"[{number}] is {type(tool).__name__}, not an object')
        if "function" not in tool:
            if "name" not in tool:
                raise ToolCallError(f'"tools"[{number}] has neither "function" nor "name"')
            tool = {"type": "function", "function": tool}
        lines.append("\n" + _to_json(tool))
    return TOOLS_HEADER + "".join(lines) + TOOLS_FOOTER if lines else ""


class UnreadableJSON(ValueError):
    """Text that ``read_json`` cannot turn into a value; the message says why."""


def read_json(text: str):
    """``json.loads``, but every way the text can fail to be read is an ``UnreadableJSON`` saying why: malformed
    JSON, and also nesting deeper than Python's recursion limit and integers longer than Python converts, which
    ``json`` reports as a RecursionError or a bare ValueError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UnreadableJSON(f"malformed JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise UnreadableJSON(f"JSON nested deeper than Python reads (about {sys.getrecursionlimit()} levels)") from None
    except ValueError:
        raise UnreadableJSON(f"JSON integer longer than Python reads ({sys.get_int_max_str_digits()} digits)") from None


def decode_json(value, where: str):
    """The value of a JSON string (ShareGPT exports store tools and calls so)."""
    if not isinstance(value, str):
        raise ToolCallError(f"{where} is {type(value).__name__}, not a JSON string")
    try:
        return read_json(value)
    except UnreadableJSON as error:
        raise ToolCallError(f"{where}: {error}") from None


def with_tools(system: str, block: str) -> str:
    """A system turn's content once the tools block is added."""
    if not block:
        return system
    return f"{system}\n\n{block}" if system else block


def calls_text(calls, where: str) -> str:
    """The text of an assistant reply's tool calls (a list of calls, or one call), one per line."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise ToolCallError(f"{where} is {type(calls).__name__}, not a list")
    return "\n".join(_call_text(call, f"{where}[{number}]") for number, call in enumerate(calls))


def _call_text(call, where: str) -> str:
    if isinstance(call, dict) and "function" in call:
        call, where = call["function"], f'{where}["function"]'
    if not isinstance(call, dict):
        raise ToolCallError(f"{where} is {type(call).__name__}, not an object")
    name, arguments = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f'{where} has no "name" string')
    if isinstance(arguments, str):
        decode_json(arguments, f'{where} "arguments"')  # kept as written, but it must be JSON
    elif isinstance(arguments, dict):
        arguments = _to_json(arguments)
    else:
        raise ToolCallError(f'{where} "arguments" is {type(arguments).__name__}, not an object or a JSON string')
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


_RESPONSE_START, _RESPONSE_END = "<tool_response>", "</tool_response>"


def responses_text(results: list[str]) -> str:
    """The user turn that carries consecutive tool results."""
    return "\n".join(f"{_RESPONSE_START}\n{result}\n{_RESPONSE_END}" for result in results)


def is_responses_text(content: str) -> bool:
    """Whether a user turn's text is tool results rather than a query (Qwen3's template tells them apart so)."""
    return content.startswith(_RESPONSE_START) and content.endswith(_RESPONSE_END)
