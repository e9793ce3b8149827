"""``megatron-qwen chat`` on a tiny model written as an export is (random weights, the real Qwen2 tokenizer, the
exported chat template): its replies are the greedy continuation of the ChatML prompt the training data would
render, one-shot and over a conversation read from the input, and sampling follows --seed."""
import io

import pytest
import torch

from hf_models import copy_tokenizer, random_qwen2
from megatron_qwen.checkpoint.hf_chat import write_chat_files
from megatron_qwen.cli import chat
from megatron_qwen.data.chatml import DEFAULT_SYSTEM_PROMPT

pytestmark = pytest.mark.slow  # builds, saves and loads a transformers model (seconds)

VOCAB = 151936  # the Qwen2 tokenizer's ids fit
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the folder, its tokenizer and model loaded once for the expected replies)."""
    folder = tmp_path_factory.mktemp("exported")
    random_qwen2(seed=3, layers=1, heads=2, kv_heads=1, vocab=VOCAB, tied=True, rope_theta=1e6).save_pretrained(folder)
    copy_tokenizer(folder)
    write_chat_files(folder, "hf", DEFAULT_SYSTEM_PROMPT, "keep")
    return folder, *chat.load(str(folder))


def greedy(tokenizer, model, chatml: str) -> str:
    """The reply decoded by hand: argmax after argmax over the prompt tokenized as plain ChatML text."""
    ids = tokenizer(chatml, return_tensors="pt")["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(ids).logits[0, -1].argmax())
            if token == im_end:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new)


def turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def test_one_shot_and_conversation_replies_are_greedy_continuations_of_chatml(exported, capsys, monkeypatch):
    folder, tokenizer, model = exported
    system = turn("system", DEFAULT_SYSTEM_PROMPT)
    first = greedy(tokenizer, model, system + turn("user", "Hello there") + "<|im_start|>assistant\n")
    second = greedy(tokenizer, model, system + turn("user", "Hello there") + turn("assistant", first)
                    + turn("user", "And?") + "<|im_start|>assistant\n")
    assert chat.main(["--hf-dir", str(folder), "--prompt", "Hello there", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == first + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd?\n\nHello there\n"))
    assert chat.main(["--hf-dir", str(folder), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    # the empty line started a new conversation: its first reply is the one-shot reply again
    assert capsys.readouterr().out == f"{first}\n{second}\n{first}\n"


def test_sampling_follows_the_seed(exported, capsys):
    folder, tokenizer, model = exported
    messages = [{"role": "user", "content": "Hi"}]
    sampled = chat.Decoding(max_new_tokens=8, temperature=1.5)
    expected = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected[seed], _ = chat.reply(tokenizer, model, messages, sampled)
    assert expected[1] != expected[2]  # the seed matters
    assert chat.main(["--hf-dir", str(folder), "--prompt", "Hi", "--temperature", "1.5", "--max-new-tokens", "8",
                      "--seed", "1"]) == 0
    assert capsys.readouterr().out == expected[1] + "\n"


def test_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    assert chat.main(["--hf-dir", str(tmp_path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megatron-qwen chat: error: --hf-dir {tmp_path}: ")
