"""megatron-qwen chat: replies from an exported Hugging Face model, rendered with its chat template.

    megatron-qwen chat --hf-dir DIR --prompt TEXT          # one reply, printed
    megatron-qwen chat --hf-dir DIR                        # a conversation: one user message per line of input

Loads DIR (``megatron-qwen convert mcore-to-hf`` output, or any Qwen chat model) with transformers, renders the
conversation through the folder's chat template with the generation prompt, and decodes until <|im_end|> or
--max-new-tokens: greedily by default, sampled with --temperature above 0 (and --top-p, --seed). In a
conversation each reply joins the history the next message is rendered with; an empty line starts a new one.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from megatron_qwen.platform.fallbacks import quiet_fallback_warnings

IM_END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-qwen chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="the exported Hugging Face model folder")
    parser.add_argument("--prompt", help="one user message: print its reply and exit (default: read messages, "
                                         "one per line, from the input)")
    parser.add_argument("--system", help="the system message (default: the chat template's own)")
    parser.add_argument("--max-new-tokens", type=int, default=Decoding.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=Decoding.temperature,
                        help="0 decodes greedily; above 0 samples at this temperature")
    parser.add_argument("--top-p", type=float, default=Decoding.top_p, help="nucleus sampling (with --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--max-new-tokens must be at least 1, --temperature at least 0 and --top-p in (0, 1]")
    return args


def load(hf_dir: str, dtype: str = "float32"):
    """(tokenizer, model in eval mode) of a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(hf_dir).is_dir():  # transformers would take the name for a Hub repository and say that instead
        raise FileNotFoundError("no such folder")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    return tokenizer, model


def reply(tokenizer, model, messages: list[dict], decoding: Decoding = Decoding()) -> tuple[str, bool]:
    """The model's next assistant message after ``messages`` (rendered by the chat template), and whether it
    ended with <|im_end|> (rather than at ``decoding.max_new_tokens``)."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    # exactly what was asked, whatever sampling the folder's generation_config.json sets (top_k 0: none)
    sampling = ({"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
                if decoding.temperature > 0 else {"do_sample": False})
    with torch.no_grad():
        output = model.generate(**prompt, **sampling, max_new_tokens=decoding.max_new_tokens, eos_token_id=im_end,
                                pad_token_id=im_end)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] == im_end
    return tokenizer.decode(new_tokens[:-1] if stopped else new_tokens), stopped


def converse(tokenizer, model, system: str | None, decoding: Decoding, lines) -> None:
    """Replies to each line of ``lines`` in turn, the conversation so far as context; an empty line starts anew."""
    start = [{"role": "system", "content": system}] if system is not None else []
    history = list(start)
    for line in lines:
        message = line.rstrip("\n")
        if not message.strip():
            history = list(start)
            continue
        history.append({"role": "user", "content": message})
        text, _ = reply(tokenizer, model, history, decoding)
        history.append({"role": "assistant", "content": text})
        print(text, flush=True)


def _input_lines():
    """The user's messages: with a prompt on a terminal, plainly from a pipe."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def main(argv=None) -> int:
    quiet_fallback_warnings()
    args = parse_args(argv)
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p)
    try:
        tokenizer, model = load(args.hf_dir, args.dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"megatron-qwen chat: error: --hf-dir {args.hf_dir}: {first_line}", file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(args.seed)
    if args.prompt is not None:
        converse(tokenizer, model, args.system, decoding, [args.prompt])
    else:
        converse(tokenizer, model, args.system, decoding, _input_lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
