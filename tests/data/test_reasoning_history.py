"""``--reasoning-history split``: a multi-turn conversation whose replies reason in several exchanges becomes one
sample per such exchange. Each sample's text is what Qwen3's own chat template (shipped in the Qwen3 tokenizer
folder, run by transformers) renders for the conversation up to the end of that exchange; the sample ends
where the test says by hand; its targets are exactly the replies no earlier sample trained on (written out
by hand); and conversations that reason in their last exchange only come out as ``keep`` writes them.
"""
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from data_fixtures import IM_END, IM_START, REPO, SAMPLES, dataset_contents, hf_tokenizer_dir, write_jsonl
from megatron_qwen.checkpoint.hf_chat import chat_template
from megatron_qwen.data import reasoning_history
from megatron_qwen.data.chatml import ChatMLRenderer, render_text, with_system_prompt
from megatron_qwen.data.conversations import parse_conversation
from megatron_qwen.data.encode import EncodeSettings
from megatron_qwen.data.preprocess import PreprocessJob, run
from megatron_qwen.data.tokenizer import load_tokenizer

SYSTEM = {"role": "system", "content": "Think, then answer."}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def user(text):
    return {"role": "user", "content": text}


def reply(text, reasoning=None, **extra):
    message = {"role": "assistant", "content": text, **extra}
    return message if reasoning is None else {**message, "reasoning_content": reasoning}


def call(city):
    return [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]


# (row, where each sample ends in the row's messages, the targets of each sample as text)
CASES = {
    "two reasoning exchanges": (
        {"messages": [SYSTEM, user("2+2?"), reply("4.", "Add them."), user("And 3+3?"), reply("6.", "Add again.")]},
        [3, 5],
        ["<think>\nAdd them.\n</think>\n\n4.<|im_end|>", "<think>\nAdd again.\n</think>\n\n6.<|im_end|>"],
    ),
    "a plain exchange between, trained with the next": (
        {"messages": [user("Hi"), reply("Hello.", "Greet."), user("Name?"), reply("Qwen."),
                      user("Sure?"), reply("Yes.", "\nCheck.\n")]},
        [2, 6],
        ["<think>\nGreet.\n</think>\n\nHello.<|im_end|>",
         "Qwen.<|im_end|><think>\nCheck.\n</think>\n\nYes.<|im_end|>"],
    ),
    "tool calls and results stay in their exchange": (
        {"messages": [user("Weather in Oslo?"), reply(None, "Look it up.", tool_calls=call("Oslo")),
                      {"role": "tool", "content": "rain"}, reply("Rain.", "Report it."),
                      user("And Rome?"), reply("Let me check.", "Again.", tool_calls=call("Rome")),
                      {"role": "tool", "content": "sun"}, reply("Sun.", "")],
         "tools": [WEATHER_TOOL]},
        [4, 8],
        ['<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
         '\n</tool_call><|im_end|><think>\nReport it.\n</think>\n\nRain.<|im_end|>',
         '<think>\nAgain.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Rome"}}\n</tool_call><|im_end|><think>\n\n</think>\n\nSun.<|im_end|>'],
    ),
    "a reply of weight 0 is context only: its exchange makes no sample": (
        {"messages": [user("2+2?"), reply("4.", "Add them.", weight=0), user("And 3+3?"), reply("6.", "Add again.")]},
        [4],
        ["<think>\nAdd again.\n</think>\n\n6.<|im_end|>"],
    ),
    "reasoning written into the content": (
        {"messages": [user("a?"), reply("<think>\nA.\n</think>\n\nx"),
                      user("b?"), reply("<think>\nB.\n</think>\n\ny")]},
        [2, 4],
        ["<think>\nA.\n</think>\n\nx<|im_end|>", "<think>\nB.\n</think>\n\ny<|im_end|>"],
    ),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(hf_tokenizer_dir())  # holds Qwen3's own chat template


@pytest.fixture(scope="module")
def renderer():
    return ChatMLRenderer(load_tokenizer(str(hf_tokenizer_dir())))


def split(row):
    conversation = parse_conversation(json.dumps(row).encode())
    return reasoning_history.samples(with_system_prompt(conversation.messages, "", conversation.tools))


def template_input(message):
    # How a server hands a message to the template: content null becomes "".
    return {**message, "content": message["content"] or ""}


@pytest.mark.parametrize("name", CASES)
def test_each_sample_is_qwen3s_template_of_the_conversation_up_to_its_end(hf_tokenizer, name):
    row, ends, _ = CASES[name]
    samples = split(row)
    assert len(samples) == len(ends)
    for sample, end in zip(samples, ends):
        prefix = [template_input(message) for message in row["messages"][:end]]
        assert render_text(sample) == hf_tokenizer.apply_chat_template(prefix, tools=row.get("tools"), tokenize=False)


@pytest.mark.parametrize("name", CASES)
def test_each_reply_is_a_target_once_in_the_sample_that_ends_its_exchange(renderer, hf_tokenizer, name):
    row, _, targets = CASES[name]
    for sample, expected in zip(split(row), targets):
        ids, loss_mask = renderer.render(sample)
        assert hf_tokenizer.decode([i for i, target in zip(ids, loss_mask) if target]) == expected


def test_plain_replies_after_the_last_reasoning_exchange_end_a_sample_of_their_own(renderer, hf_tokenizer):
    # (Qwen3's template would add an empty <think> block to the last, plain reply; ours writes rows as given.)
    row = {"messages": [user("Hi"), reply("Hello.", "Greet."), user("Bye"), reply("Bye.")]}
    first, second = split(row)
    assert render_text(second) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                                   "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n")
    for sample, expected in ((first, "<think>\nGreet.\n</think>\n\nHello.<|im_end|>"), (second, "Bye.<|im_end|>")):
        ids, loss_mask = renderer.render(sample)
        assert hf_tokenizer.decode([i for i, target in zip(ids, loss_mask) if target]) == expected


@pytest.mark.parametrize("name", CASES)
def test_the_exported_split_template_serves_the_context_the_last_sample_trained_on(hf_tokenizer, name):
    # A served request holds the conversation so far, with every earlier reply's reasoning if the client
    # sends it back; the prompt must be the last sample's text up to its last reply.
    row, _, _ = CASES[name]
    last = split(row)[-1]
    history = [template_input(message) for message in row["messages"][:-1]]
    served = hf_tokenizer.apply_chat_template(history, tools=row.get("tools"), chat_template=chat_template("", "split"),
                                              add_generation_prompt=True, tokenize=False)
    assert served == render_text(last[:-1]) + "<|im_start|>assistant\n"
    # keep (the default) serves the earlier reasoning as written: the whole row as keep writes it, but its last reply
    kept = hf_tokenizer.apply_chat_template(history, tools=row.get("tools"), chat_template=chat_template(""),
                                            add_generation_prompt=True, tokenize=False)
    conversation = parse_conversation(json.dumps(row).encode())
    as_kept = with_system_prompt(conversation.messages, "", conversation.tools)
    assert kept != served and kept == render_text(as_kept[:-1]) + "<|im_start|>assistant\n"


def test_history_replies_take_a_user_turns_frame_targets_under_qwen_finetune():
    row, _, _ = CASES["two reasoning exchanges"]
    second = split(row)[1]  # system, user, the first reply as history, user, the second reply
    ids, loss_mask = ChatMLRenderer(load_tokenizer(str(hf_tokenizer_dir())), "qwen-finetune").render(second)
    start = [index for index, id_ in enumerate(ids) if id_ == IM_START][2]
    end = [index for index, id_ in enumerate(ids) if id_ == IM_END][2] + 2
    # <|im_start|>assistant\n4.<|im_end|>\n: only <|im_start|>, <|im_end|> and the last "\n" are targets
    assert loss_mask[start] == 1 and loss_mask[end - 2:end] == [1, 1] and not any(loss_mask[start + 1:end - 2])


def job(inputs, prefix, seq_length=2048, reasoning="split"):
    settings = EncodeSettings(seq_length=seq_length, reasoning_history=reasoning)
    return PreprocessJob(inputs=list(inputs), tokenizer=str(hf_tokenizer_dir()), output_prefix=prefix,
                         settings=settings, progress=False)


def test_conversations_reasoning_in_their_last_exchange_only_are_written_as_keep_writes_them(tmp_path):
    rows = [REPO / "examples" / "data" / "chat_tools.jsonl", *SAMPLES]
    one_exchange = write_jsonl(tmp_path / "one.jsonl", [
        {"messages": [user("Hi"), reply("Hello.", "Greet.")]},
        {"messages": [user("Hi"), reply("Hello."), user("Why?"), reply("Because.", "Explain.")]},
        {"messages": [user("Weather?"), reply(None, "Look.", tool_calls=call("Oslo")), {"role": "tool", "content": "x"},
                      reply("x.", "Report.")], "tools": [WEATHER_TOOL]},
    ])
    keep = run(job([*rows, one_exchange], tmp_path / "keep", reasoning="keep"))
    split_stats = run(job([*rows, one_exchange], tmp_path / "split"))
    assert dataset_contents(tmp_path / "keep") == dataset_contents(tmp_path / "split")
    assert split_stats["conversations"] == keep["conversations"]
    assert split_stats["conversations"]["added_by_split"] == 0


def test_split_samples_are_counted_and_never_written_without_targets(tmp_path):
    row, _, _ = CASES["two reasoning exchanges"]
    path = write_jsonl(tmp_path / "rows.jsonl", [row] * 3)
    stats = run(job([path], tmp_path / "whole"))
    assert stats["conversations"]["read"] == 3 and stats["conversations"]["written"] == 6
    assert stats["conversations"]["added_by_split"] == 3
    assert stats["provenance"]["reasoning_history"] == "split"
    # Too short for the second sample: cut at a turn boundary, it would keep only context, so it is dropped.
    first_sample_length = stats["conversation_length"]["min"]
    stats = run(job([path], tmp_path / "short", seq_length=first_sample_length + 6))
    assert stats["conversations"]["written"] == 3 and stats["conversations"]["dropped_overlong"] == 3
    mask = IndexedDataset(str(tmp_path / "short_loss_mask_document"))
    assert all(np.count_nonzero(mask[index]) for index in range(len(mask)))
