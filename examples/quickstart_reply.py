"""The last step of the CPU quickstart: does the exported model reproduce the conversation it memorized?

    python examples/quickstart_reply.py HF_DIR CONVERSATION_JSONL

Loads HF_DIR (written by ``convert_checkpoint.py mcore-to-hf``) with ``transformers``, renders the first
conversation of CONVERSATION_JSONL without its last assistant reply through the exported chat template
(with the generation prompt), decodes greedily until ``<|im_end|>``, prints the reply and exits 1 unless it
equals the conversation's last assistant reply and generation stopped at ``<|im_end|>``.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def prompt_and_reply(path):
    with open(path) as f:
        messages = json.loads(f.readline())["messages"]
    if messages[-1]["role"] != "assistant":
        raise SystemExit(f"{path}: the first conversation does not end with an assistant reply")
    return messages[:-1], messages[-1]["content"]


def main(hf_dir, conversation_path):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    messages, expected = prompt_and_reply(conversation_path)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    budget = len(tokenizer(expected)["input_ids"]) + 8
    with torch.no_grad():
        output = model.generate(**prompt, do_sample=False, max_new_tokens=budget, eos_token_id=im_end, pad_token_id=im_end)
    new_tokens = output[0, prompt["input_ids"].shape[1] :].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] == im_end
    reply = tokenizer.decode(new_tokens[:-1] if stopped else new_tokens)
    print(f"prompt:   {messages[-1]['content']}")
    print(f"reply:    {reply}" + ("  [stopped at <|im_end|>]" if stopped else "  [did not stop at <|im_end|>]"))
    print(f"expected: {expected}")
    if reply != expected or not stopped:
        print("quickstart: the exported model did not reproduce the memorized reply", file=sys.stderr)
        return 1
    print("quickstart: the exported model reproduces the memorized reply")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
