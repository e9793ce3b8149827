"""What an exported model needs to chat the way it was trained: template, end tokens, tokenizer config.

The chat template renders exactly the training data's ChatML (``megatron_qwen.data.chatml``): a
system turn with the training data's default system prompt first when the conversation has none (none
when that prompt was empty), then ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, and
``<|im_start|>assistant\\n`` when a generation prompt is asked for. ``generation_config.json`` ends
generation at ``<|im_end|>`` (the end of a reply) or ``<|endoftext|>``, so a served model stops after
its answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_qwen.data.tokenizer import ENDOFTEXT, IM_END

ENDOFTEXT_ID = 151643
IM_END_ID = 151645
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _jinja_string(text: str) -> str:
    """A Jinja string literal (JSON's escapes are ones Jinja reads back the same)."""
    return json.dumps(text)


def chat_template(system_prompt: str) -> str:
    """The template of ``with_system_prompt(messages, system_prompt)`` rendered as ChatML."""
    default_system_turn = (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{{- " + _jinja_string(f"<|im_start|>system\n{system_prompt}<|im_end|>\n") + " }}"
        "{%- endif %}"
    ) if system_prompt else ""
    return (
        default_system_turn
        + "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def generation_config() -> dict:
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    }


def write_chat_files(out_dir: Path, tokenizer_kind: str, system_prompt: str) -> None:
    """Writes ``generation_config.json`` and the chat template for ``system_prompt`` (as ``chat_template.jinja``
    and inside ``tokenizer_config.json``, creating that file for a tokenizer folder that lacks one)."""
    template = chat_template(system_prompt)
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
