"""The last step of the CPU quickstart: does the exported model reproduce the conversation it memorized?

    python examples/quickstart_reply.py HF_DIR CONVERSATION_JSONL

Loads HF_DIR (written by ``megatron-qwen convert mcore-to-hf``) with ``transformers``, renders the first
conversation of CONVERSATION_JSONL without its last assistant reply through the exported chat template
(with the generation prompt), decodes greedily until ``<|im_end|>`` (as ``megatron-qwen chat`` does), prints
the reply and exits 1 unless it equals the conversation's last assistant reply and generation stopped at
``<|im_end|>``.
"""
import json
import sys

from megatron_qwen.cli.chat import Decoding, load, reply


def prompt_and_reply(path):
    with open(path) as f:
        messages = json.loads(f.readline())["messages"]
    if messages[-1]["role"] != "assistant":
        raise SystemExit(f"{path}: the first conversation does not end with an assistant reply")
    return messages[:-1], messages[-1]["content"]


def main(hf_dir, conversation_path):
    tokenizer, model = load(hf_dir)
    messages, expected = prompt_and_reply(conversation_path)
    budget = len(tokenizer(expected)["input_ids"]) + 8
    answer, stopped = reply(tokenizer, model, messages, Decoding(max_new_tokens=budget))
    print(f"prompt:   {messages[-1]['content']}")
    print(f"reply:    {answer}" + ("  [stopped at <|im_end|>]" if stopped else "  [did not stop at <|im_end|>]"))
    print(f"expected: {expected}")
    if answer != expected or not stopped:
        print("quickstart: the exported model did not reproduce the memorized reply", file=sys.stderr)
        return 1
    print("quickstart: the exported model reproduces the memorized reply")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
