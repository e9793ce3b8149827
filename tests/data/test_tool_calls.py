"""Function-calling conversations (examples/data/chat_tools.jsonl) and replies with reasoning: rendered as
Qwen3's own chat template renders them (the template shipped in the Qwen3 tokenizer folder, run by
transformers), supervised on the replies, their reasoning and calls only, served by the exported template
exactly as trained, and bad rows named (also 3000 randomly broken ones: rejected with a reason, never a crash)."""
import json
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from data_fixtures import REPO, hf_tokenizer_dir
from megatron_qwen.checkpoint.hf_chat import chat_template
from megatron_qwen.data.chatml import DEFAULT_SYSTEM_PROMPT, ChatMLRenderer, render_text, with_system_prompt
from megatron_qwen.data.conversations import ConversationError, parse_conversation
from megatron_qwen.data.encode import EncodeSettings
from megatron_qwen.data.preprocess import PreprocessJob, run
from megatron_qwen.data.tokenizer import load_tokenizer

TOOL_ROWS = [json.loads(line) for line in (REPO / "examples" / "data" / "chat_tools.jsonl").read_text().splitlines()]
OPENAI_ROWS = [row for row in TOOL_ROWS if "messages" in row]
SHAREGPT_ROWS = [row for row in TOOL_ROWS if "conversations" in row]


def openai_form(row: dict) -> tuple[list, list]:
    """(messages, tools) of a row as an OpenAI-compatible server hands them to a chat template. ShareGPT rows
    are mapped by hand here: function_call -> an assistant message with tool_calls, observation -> tool."""
    if "messages" in row:
        return [{**m, "content": m["content"] or ""} for m in row["messages"]], row.get("tools") or []
    roles = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool"}
    messages = []
    for turn in row["conversations"]:
        if turn["from"] == "function_call":
            calls = json.loads(turn["value"])
            calls = calls if isinstance(calls, list) else [calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": call} for call in calls]})
        else:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    tools = [{"type": "function", "function": tool} for tool in json.loads(row["tools"])]
    return messages, tools


def ours(row: dict, system_prompt: str) -> list:
    conversation = parse_conversation(json.dumps(row, ensure_ascii=False).encode())
    return with_system_prompt(conversation.messages, system_prompt, conversation.tools)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(hf_tokenizer_dir())  # holds Qwen3's own chat template


@pytest.mark.parametrize("row", TOOL_ROWS, ids=range(len(TOOL_ROWS)))
def test_rows_render_as_qwen3s_own_chat_template(hf_tokenizer, row):
    # A user turn is appended so that Qwen3's template, like ours, writes no <think> block into any reply
    # (it adds one only to the replies after the last user message). Qwen3's template adds no default
    # system prompt, so ours renders with an empty one.
    messages, tools = openai_form(row)
    list_key, thanks = (("messages", {"role": "user", "content": "Thanks."}) if "messages" in row
                        else ("conversations", {"from": "human", "value": "Thanks."}))
    asked_again = {**row, list_key: [*row[list_key], thanks]}
    reference = hf_tokenizer.apply_chat_template([*messages, {"role": "user", "content": "Thanks."}], tools=tools,
                                                 tokenize=False)
    assert render_text(ours(asked_again, "")) == reference


def test_sharegpt_function_calls_equal_their_openai_form():
    for row in SHAREGPT_ROWS:
        messages, tools = openai_form(row)
        openai_row = {"messages": messages, "tools": tools}
        assert ours(row, DEFAULT_SYSTEM_PROMPT) == ours(openai_row, DEFAULT_SYSTEM_PROMPT)


@pytest.mark.parametrize("system_prompt", ["", DEFAULT_SYSTEM_PROMPT])
def test_exported_template_serves_the_trained_ids(hf_tokenizer, system_prompt):
    template = chat_template(system_prompt)
    renderer = ChatMLRenderer(load_tokenizer(str(hf_tokenizer_dir())))
    for row in TOOL_ROWS:
        messages, tools = openai_form(row)
        if "conversations" in row:  # bare function schemas, which both wrap as {"type": "function", ...}
            tools = json.loads(row["tools"])
        trained = ours(row, system_prompt)
        served = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)
        assert served == render_text(trained) + "<|im_start|>assistant\n"
        served_ids = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                                      tokenize=True, return_dict=False)
        assert list(served_ids) == renderer.render(trained)[0]


def test_only_replies_and_calls_are_supervised(tmp_path):
    prefix = tmp_path / "tools"
    run(PreprocessJob(inputs=[REPO / "examples" / "data" / "chat_tools.jsonl"], tokenizer=str(hf_tokenizer_dir()),
                      output_prefix=prefix, progress=False, settings=EncodeSettings(system_prompt="")))
    tokenizer = load_tokenizer(str(hf_tokenizer_dir()))
    tokens, masks = IndexedDataset(f"{prefix}_text_document"), IndexedDataset(f"{prefix}_loss_mask_document")
    assert len(tokens) == len(TOOL_ROWS)

    def supervised(index):
        return tokenizer.decode(tokens[index][masks[index].astype(bool)])

    assert supervised(1) == (  # two calls after the reply's text, arguments kept as written
        "I'll check both cities.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "東京: 12 °C and clear. Paris: 7 °C with rain.<|im_end|>")
    assert supervised(5) == (  # ShareGPT: a function_call turn holding a list of calls
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>'
        "In Berlin sind es 9 °C.<|im_end|>")
    for index in range(len(TOOL_ROWS)):
        text = tokenizer.decode(tokens[index])
        assert "<tool_response>" in text or index == 3  # row 3 offers tools but calls none
        assert "<tool_response>" not in supervised(index) and "# Tools" not in supervised(index)
        assert np.array_equal(tokens[index], ChatMLRenderer(tokenizer).render(ours(TOOL_ROWS[index], ""))[0])


CALL = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}, {"role": "assistant", "content": "b"}]},
     '"messages"[0] has "tool_calls" but is a user turn'),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{x: 1}"}}]}]},
     '"messages"[0] "tool_calls"[0]["function"] "arguments": malformed JSON'),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]},
     '"messages"[0] "tool_calls"[0] has no "name" string'),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]}]},
     '"messages"[0] "tool_calls"[0] "arguments" is int, not an object or a JSON string'),
    ({"messages": [{"role": "assistant", "content": None}]}, '"messages"[0] "content" is NoneType, not a string'),
    ({"messages": [{"role": "tool", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     '"messages"[0] "content" is list, not a string'),
    ({"messages": [{"role": "assistant", "content": "b"}], "tools": {"name": "f"}}, '"tools" is dict, not a list'),
    ({"messages": [{"role": "assistant", "content": "b"}], "tools": "[{"}, '"tools": malformed JSON'),
    ({"messages": [{"role": "assistant", "content": "b"}], "tools": [{"description": "no name"}]},
     '"tools"[0] has neither "function" nor "name"'),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "get(1)"}]},
     '"conversations"[1] "value": malformed JSON'),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     '"conversations"[1] "value"[0] has no "name" string'),
])
def test_bad_function_calling_rows_are_named(row, reason):
    with pytest.raises(ConversationError) as error:
        parse_conversation(json.dumps(row).encode())
    assert reason in str(error.value)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
REASONING_ROWS = [  # replies after the last user message, the ones Qwen3's template keeps reasoning for
    {"messages": [{"role": "user", "content": "Is 91 prime?"},
                  {"role": "assistant", "content": "\n\nNo: 91 = 7 x 13.",
                   "reasoning_content": "\nTry 7: 7 x 13 = 91.\n"}]},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "reasoning_content": ""}]},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": "", "reasoning_content": "Call the tool.", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": "-6"},
                  {"role": "assistant", "content": "-6 °C.", "reasoning_content": "The tool said -6."}],
     "tools": [WEATHER]},
]


@pytest.mark.parametrize("row", REASONING_ROWS, ids=range(len(REASONING_ROWS)))
def test_reasoning_leads_the_reply_as_in_qwen3s_own_chat_template(hf_tokenizer, row):
    messages, tools = openai_form(row)
    assert render_text(ours(row, "")) == hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    served = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template(""), tokenize=False)
    assert served == render_text(ours(row, ""))


def test_reasoning_is_supervised_with_its_reply():
    renderer = ChatMLRenderer(load_tokenizer(str(hf_tokenizer_dir())))
    ids, mask = renderer.render(ours(REASONING_ROWS[0], ""))
    supervised = renderer.tokenizer.decode([token for token, target in zip(ids, mask) if target])
    assert supervised == "<think>\nTry 7: 7 x 13 = 91.\n</think>\n\nNo: 91 = 7 x 13.<|im_end|>"


@pytest.mark.parametrize("message, reason", [
    ({"role": "assistant", "content": "a", "reasoning_content": ["r"]},
     '"messages"[1] "reasoning_content" is list, not a string'),
    ({"role": "user", "content": "a", "reasoning_content": "r"},
     '"messages"[1] has "reasoning_content" but is a user turn'),
])
def test_bad_reasoning_is_named(message, reason):
    row = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ConversationError) as error:
        parse_conversation(json.dumps(row).encode())
    assert reason in str(error.value)


def _mutated(row, rng):
    """``row`` with one value somewhere (the row itself included) replaced by a value of another kind, or
    removed from its object."""
    row = json.loads(json.dumps(row))
    places = []

    def visit(value, parent, key):
        places.append((parent, key))
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for child_key, child in children:
            visit(child, value, child_key)

    visit(row, None, None)
    parent, key = rng.choice(places)
    replacement = rng.choice([None, 0, 1.5, True, "", "x", "{}", "[1]", [], [1], {}, {"name": "f"}, {"function": 3},
                              "\ud800"])
    if parent is None:
        return replacement
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = replacement
    return row


def test_any_malformed_row_is_rejected_with_a_reason_never_a_crash():
    # 3000 rows of the samples, each with up to three values swapped for values of other kinds: every one either
    # parses into turns the renderer takes or raises ConversationError (which the tool reports as FILE:LINE)
    rng = random.Random(0)
    samples = TOOL_ROWS + REASONING_ROWS
    outcomes = {"parsed": 0, "rejected": 0}
    for _ in range(3000):
        row = rng.choice(samples)
        for _ in range(rng.randint(1, 3)):
            row = _mutated(row, rng)
        try:
            conversation = parse_conversation(json.dumps(row).encode())
        except ConversationError:
            outcomes["rejected"] += 1
            continue
        messages = with_system_prompt(conversation.messages, "", conversation.tools)
        assert all(role in ("system", "user", "assistant") and isinstance(content, str) for role, content in messages)
        outcomes["parsed"] += 1
    assert outcomes["parsed"] > 100 and outcomes["rejected"] > 100, outcomes
