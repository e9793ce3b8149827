"""The ``megatron-qwen`` command's help: every subcommand (and ``python -m megatron_qwen.train``, and a tools/ script)
answers ``--help`` without importing torch or megatron-core, naming itself as it was typed; an unknown subcommand
is refused in one line."""
import json
import subprocess
import sys

import pytest

from workers import REPO, worker_env

pytestmark = pytest.mark.slow  # starts Python processes (a fresh sys.modules each)

HEAVY = ("torch", "megatron.core")

# Every subcommand's --help in one process, then which heavy modules that process imported.
HELP_OF_EVERY_SUBCOMMAND = """
import contextlib, io, json, sys
from megatron_qwen.cli import SUBCOMMANDS, main
found = {}
for argv in [[], *([name, "--help"] for name in SUBCOMMANDS), ["convert", "mcore-to-hf", "--help"]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
    found[" ".join(argv)] = [status, out.getvalue().splitlines()[0]]
heavy = sorted(name for name in sys.modules if name.split(".")[0] == "torch" or name.startswith("megatron.core"))
print(json.dumps({"first_lines": found, "heavy": heavy[:5]}))
"""


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120)


def imported(importtime_log: str) -> set[str]:
    """The modules that ``python -X importtime`` reported importing."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_every_subcommand_answers_help_without_torch_or_megatron_core():
    result = run("-c", HELP_OF_EVERY_SUBCOMMAND)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["heavy"] == []
    first_lines = found["first_lines"]
    assert first_lines.pop("") == [0, "usage: megatron-qwen SUBCOMMAND [--help] [ARGS ...]"]
    assert first_lines.pop("convert mcore-to-hf --help")[1].startswith("usage: megatron-qwen convert mcore-to-hf ")
    for argv, (status, usage) in first_lines.items():
        name = argv.removesuffix(" --help")
        assert status == 0 and usage.startswith(f"usage: megatron-qwen {name} "), (argv, usage)
    assert set(first_lines) == {"preprocess --help", "inspect --help", "convert --help", "verify --help",
                                "train --help", "benchmark --help", "chat --help"}


@pytest.mark.parametrize("argv, usage", [
    (["-m", "megatron_qwen.train", "--help"], "usage: python -m megatron_qwen.train "),
    ([str(REPO / "tools" / "verify_conversion.py"), "--help"], "usage: megatron-qwen verify "),
])
def test_module_and_tool_scripts_answer_help_without_torch(argv, usage):
    result = run("-X", "importtime", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(usage)
    assert not imported(result.stderr) & set(HEAVY)


def test_an_unknown_subcommand_is_refused_in_one_line():
    result = run("-c", "import sys; from megatron_qwen.cli import main; sys.exit(main(['trian']))")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "megatron-qwen: error: unknown subcommand 'trian'"
