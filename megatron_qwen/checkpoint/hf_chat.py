"""What an exported model needs to chat the way it was trained: template, end tokens, tokenizer config.

The chat template renders exactly the training data's ChatML (``megatron_qwen.data.chatml``): a
system turn with the training data's default system prompt first when the conversation has none (none
when that prompt was empty), then ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, and
``<|im_start|>assistant\\n`` when a generation prompt is asked for; ``tools``, tool calls, tool results and a
reply's reasoning as ``data.conversations`` writes them into the training data (and, for data preprocessed
with ``--reasoning-history split``, earlier replies as ``data.reasoning_history`` writes them).
``generation_config.json`` ends generation at ``<|im_end|>`` (the end of a reply) or ``<|endoftext|>``, so a
served model stops after its answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_qwen.data.reasoning_history import DEFAULT_REASONING_HISTORY
from megatron_qwen.data.tokenizer import ENDOFTEXT, IM_END
from megatron_qwen.data.tool_calls import TOOLS_FOOTER, TOOLS_HEADER

ENDOFTEXT_ID = 151643
IM_END_ID = 151645
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _jinja_string(text: str) -> str:
    """A Jinja string literal (JSON's escapes are ones Jinja reads back the same)."""
    return json.dumps(text)


def chat_template(system_prompt: str, reasoning_history: str = DEFAULT_REASONING_HISTORY) -> str:
    """The template of ``with_system_prompt(messages, system_prompt, tools)`` rendered as ChatML, with
    reasoning, tool calls and tool results written as ``data.conversations`` writes them; with
    ``reasoning_history="split"``, the replies before the last user query as ``data.reasoning_history``
    writes its context: the text after the last ``</think>``, reasoning dropped."""
    reply = (
        "{%- if message['role'] == 'assistant' and message['reasoning_content'] is string %}"
        "{{- '<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n'"
        " + (message['content'] or '').lstrip('\\n') }}"
        "{%- else %}{{- message['content'] or '' }}{%- endif %}"
    )
    find_last_query = ""
    if reasoning_history == "split":
        find_last_query = (
            "{%- set query = namespace(last=-1) %}"
            "{%- for message in messages %}"
            "{%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
            " and message['content'].endswith('</tool_response>')) %}{%- set query.last = loop.index0 %}{%- endif %}"
            "{%- endfor %}"
        )
        reply = (
            "{%- if message['role'] == 'assistant' and loop.index0 < query.last %}"
            "{{- (message['content'] or '').split('</think>')[-1].lstrip('\\n') }}"
            "{%- else %}" + reply + "{%- endif %}"
        )
    return (
        "{%- set given = messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] if given else " + _jinja_string(system_prompt) + " %}"
        "{%- set messages = messages[1:] if given else messages %}"
        "{%- if tools %}"
        "{%- set ns = namespace(block=" + _jinja_string(TOOLS_HEADER) + ") %}"
        "{%- for tool in tools %}"
        "{%- if 'function' not in tool %}{%- set tool = {'type': 'function', 'function': tool} %}{%- endif %}"
        "{%- set ns.block = ns.block + '\\n' + (tool | tojson) %}"
        "{%- endfor %}"
        "{%- set system = (system + '\\n\\n' if system else '') + ns.block + " + _jinja_string(TOOLS_FOOTER) + " %}"
        "{%- endif %}"
        "{%- if system or given %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
        + find_last_query +
        "{%- for message in messages %}"
        "{%- if message['role'] == 'tool' %}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user\\n' }}"
        "{%- else %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        + reply +
        "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
        "{%- for call in message['tool_calls'] %}"
        "{%- if 'function' in call %}{%- set call = call['function'] %}{%- endif %}"
        "{%- if not loop.first or message['content'] %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
        "{%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}"
        "{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def generation_config() -> dict:
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    }


def write_chat_files(out_dir: Path, tokenizer_kind: str, system_prompt: str, reasoning_history: str) -> None:
    """Writes ``generation_config.json`` and the chat template for ``system_prompt`` and ``reasoning_history``
    (as ``chat_template.jinja`` and inside ``tokenizer_config.json``, creating that file for a tokenizer folder
    that lacks one)."""
    template = chat_template(system_prompt, reasoning_history)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    config_path = out_dir / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else _minimal_tokenizer_config(tokenizer_kind)
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _minimal_tokenizer_config(tokenizer_kind: str) -> dict:
    if tokenizer_kind == "qwen":  # qwen.tiktoken needs Qwen's tokenization_qwen.py (trust_remote_code)
        return {
            "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }
