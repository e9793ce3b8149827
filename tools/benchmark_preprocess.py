#!/usr/bin/env python
"""Benchmark tools/preprocess_chatml.py against the bare tokenizer on the same generated chat text.

    python tools/benchmark_preprocess.py [--sizes-mb 50 250] [--workers 2] [--tokenizer qwen]

Generates one JSON Lines corpus of chat conversations (English, Chinese, code, numbers; the smaller
size is a prefix of the larger), then for each size runs, as separate processes with the same number
of worker processes:

* the tool, writing a full dataset (rendering, masks, indexed-dataset output, stats);
* the bare tokenizer, a plain program that takes nothing from the tool but where Qwen's vocabulary file
  is and its pre-tokenization pattern: each worker process opens the file, reads its share of the lines
  (those starting in its slice of the file's bytes, split evenly), ``json.loads`` each line and encodes
  every message's content with tiktoken's ``encode_ordinary`` over that vocabulary, and nothing else.

It prints each one's wall time and CPU time, their steady-state throughputs (the marginal rate between
the two sizes, in input MB/s, so fixed start-up costs cancel), the ratio tool/bare of those rates, and
the tool's start-up time on a one-conversation input. The CPU-time ratio is the robust one on a shared
machine; the wall-time ratio is the one a user sees on an idle one.
"""
import argparse
import json
import multiprocessing
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_qwen.data.tokenizer import QWEN_PATTERN, load_tokenizer  # noqa: E402

ENGLISH = ("the of and to in is that for it as with was on be by this are from or have an they which one you "
           "were all we when your can said there use each she do how their if will up other about out many then "
           "them these so some her would make like him into time has look two more write go see number no way "
           "could people my than first water been call who its now find long down day did get come made may part "
           "model training data token loss gradient layer attention batch sequence").split()
CHINESE = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
           "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
           "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结")


def sentence_pool(rng: random.Random, count: int) -> list[str]:
    pool = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.55:
            words = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(5, 25)))
            pool.append(words.capitalize() + rng.choice(".?!,"))
        elif kind < 0.8:
            pool.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(8, 40))) + rng.choice("。？，"))
        elif kind < 0.9:
            pool.append(f"def f{i}(x):\n    return x * {rng.randint(0, 999)} + {rng.random():.3f}\n")
        else:
            pool.append(f"{rng.randint(1, 10**6)} items cost ${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}.")
    return pool


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = sentence_pool(rng, 20000)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": " ".join(rng.sample(pool, 2))})
            for _ in range(rng.randint(1, 4)):
                messages.append({"role": "user", "content": " ".join(rng.sample(pool, rng.randint(1, 4)))})
                messages.append({"role": "assistant", "content": " ".join(rng.sample(pool, rng.randint(2, 12)))})
            line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))


def prefix_of(source: Path, target: Path, size_bytes: int) -> None:
    """The whole lines of ``source`` that fit in ``size_bytes``."""
    with open(source, "rb") as src, open(target, "wb") as out:
        written = 0
        for line in src:
            if written + len(line) > size_bytes:
                break
            out.write(line)
            written += len(line)


# --- the bare tokenizer (runs in a child process: `--bare FILE`) ---
_bare_encoding = None  # set before the workers fork, so they inherit it


def _load_bare_encoding(tokenizer_spec: str) -> None:
    import tiktoken
    import tiktoken.load

    global _bare_encoding
    vocab_file = load_tokenizer(tokenizer_spec).vocab_file
    if vocab_file.name != "qwen.tiktoken":
        raise SystemExit("the bare baseline encodes with qwen.tiktoken: run the benchmark with --tokenizer qwen")
    ranks = tiktoken.load.load_tiktoken_bpe(str(vocab_file))
    _bare_encoding = tiktoken.Encoding("bare", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                       special_tokens={"<|endoftext|>": len(ranks)})


def bare_share_tokens(path: Path, share: int, shares: int) -> int:
    """Message tokens of the lines that start in byte slice ``share`` of ``shares`` equal slices of the file."""
    size = path.stat().st_size
    start, end = size * share // shares, size * (share + 1) // shares
    tokens = 0
    with open(path, "rb") as lines:
        if start:
            lines.seek(start - 1)
            start += len(lines.readline()) - 1  # the line under way at the slice's start is the previous share's
        while start < end:
            line = lines.readline()
            if not line:
                break
            start += len(line)
            for message in json.loads(line)["messages"]:
                tokens += len(_bare_encoding.encode_ordinary(message["content"]))
    return tokens


def run_bare(path: Path, tokenizer_spec: str, workers: int) -> int:
    _load_bare_encoding(tokenizer_spec)
    if workers == 1:
        return bare_share_tokens(path, 0, 1)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.starmap(bare_share_tokens, [(path, share, workers) for share in range(workers)]))


# --- the driver ---
def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (the child and its workers) and stdout of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def tool_command(path: Path, prefix: Path, args) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "preprocess_chatml.py"), "--input", str(path),
            "--tokenizer", args.tokenizer, "--output-prefix", str(prefix), "--workers", str(args.workers),
            "--no-progress"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs=2, default=[50, 250])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", default="qwen")
    parser.add_argument("--workdir", type=Path, help="where to put the corpus and outputs (default: a temp dir)")
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(run_bare(args.bare, args.tokenizer, args.workers))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        scratch = Path(scratch)
        small_mb, large_mb = sorted(args.sizes_mb)
        large, small = scratch / "large.jsonl", scratch / "small.jsonl"
        write_corpus(large, int(large_mb * 1e6))
        prefix_of(large, small, int(small_mb * 1e6))
        one = scratch / "one.jsonl"
        prefix_of(small, one, len(small.open("rb").readline()))
        results = {}
        for name, path in (("small", small), ("large", large)):
            size = path.stat().st_size
            tool = timed(tool_command(path, scratch / f"out_{name}", args))
            stats = json.loads((scratch / f"out_{name}_stats.json").read_text())
            bare = timed([sys.executable, __file__, "--bare", str(path), "--tokenizer", args.tokenizer,
                          "--workers", str(args.workers)])
            results[name] = {"bytes": size, "tool": tool[:2], "bare": bare[:2],
                             "tool_tokens": stats["tokens"]["total"], "bare_tokens": int(bare[2])}
            print(f"{name}: {size / 1e6:.1f} MB, {stats['conversations']['written']} conversations | "
                  f"tool {tool[0]:.2f} s wall, {tool[1]:.2f} s CPU, {stats['tokens']['total']} tokens | "
                  f"bare {bare[0]:.2f} s wall, {bare[1]:.2f} s CPU, {int(bare[2])} tokens", flush=True)
        startup = min(timed(tool_command(one, scratch / "out_one", args))[0] for _ in range(2))
    extra_mb = (results["large"]["bytes"] - results["small"]["bytes"]) / 1e6
    extra_tokens = {who: results["large"][f"{who}_tokens"] - results["small"][f"{who}_tokens"] for who in ("tool", "bare")}
    print(f"\nsteady state ({args.workers} worker processes each; marginal rate between the two sizes):")
    for clock, index in (("wall", 0), ("CPU", 1)):
        seconds = {who: results["large"][who][index] - results["small"][who][index] for who in ("tool", "bare")}
        mb_rate = {who: extra_mb / seconds[who] for who in seconds}
        token_rate = {who: extra_tokens[who] / seconds[who] / 1e6 for who in seconds}
        print(f"  {clock:4s}: input MB/s: tool {mb_rate['tool']:.2f}, bare {mb_rate['bare']:.2f}, "
              f"ratio {mb_rate['tool'] / mb_rate['bare']:.3f} | M tokens/s (tool: written incl. ChatML frame and "
              f"system prompts; bare: message tokens): tool {token_rate['tool']:.2f}, bare {token_rate['bare']:.2f}, "
              f"ratio {token_rate['tool'] / token_rate['bare']:.3f}")
    print(f"tool start-up (one conversation, best of 2): {startup:.2f} s")


if __name__ == "__main__":
    main()
