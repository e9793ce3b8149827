"""tools/benchmark_preprocess.py's bare tokenizer counts every message token of the corpus once, however the file
is split between worker processes: its count equals the project's tokenizer run over every message of the file."""
import json
import sys

import pytest

from workers import REPO
from megatron_qwen.data.tokenizer import load_tokenizer

sys.path.insert(0, str(REPO / "tools"))
import benchmark_preprocess as benchmark  # noqa: E402  (the workers it forks find their function by this name)

pytestmark = pytest.mark.slow  # forks worker processes


def message_tokens(path) -> int:
    tokenizer = load_tokenizer("qwen")
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(len(tokenizer.encode(message["content"])) for line in lines for message in json.loads(line)["messages"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    benchmark.write_corpus(path, 60_000)
    return path


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_bare_tokenizer_counts_every_message_token_once(corpus, workers):
    assert benchmark.run_bare(corpus, "qwen", workers) == message_tokens(corpus)


def test_slices_starting_at_every_byte_count_each_line_once(corpus, tmp_path):
    """As many slices as bytes: each line's first byte starts a slice, every other byte starts one inside a line."""
    few_lines = tmp_path / "few_lines.jsonl"
    benchmark.prefix_of(corpus, few_lines, 20_000)
    benchmark.run_bare(few_lines, "qwen", 1)  # loads the encoding into this process
    size = few_lines.stat().st_size
    assert few_lines.read_bytes().count(b"\n") >= 5
    counted = sum(benchmark.bare_share_tokens(few_lines, share, size) for share in range(size))
    assert counted == message_tokens(few_lines)
