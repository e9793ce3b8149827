"""``pip install`` of the built wheel gives a working ``megatron-qwen`` on its own: the wheel is built from the
checkout's package and setup.py, installed without dependencies into a fresh virtual environment that reaches this
environment's packages (torch, megatron-core, ...) through a ``.pth`` file but not the checkout, and its command
preprocesses and inspects the bundled sample data from a folder of its own, running the installed megatron_qwen."""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from workers import REPO

pytestmark = pytest.mark.slow  # builds a wheel, makes a virtual environment, runs the installed command


def run(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the virtual environment's bin folder, an environment without PYTHONPATH, a working folder)."""
    work = tmp_path_factory.mktemp("wheel")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    # the checkout's package and setup.py, built where no build/ or egg-info lands in the checkout
    source = work / "source"
    shutil.copytree(REPO / "megatron_qwen", source / "megatron_qwen", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", source)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist", "."],
        source, env)
    wheel = next((work / "dist").glob("megatron_qwen-*.whl"))
    environment = work / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work,
                             env).stdout.strip())
    # this environment's packages as a plain path entry: its own .pth files (the editable checkout) are not read
    (site_packages / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], work, env)
    shutil.rmtree(source)
    return environment / "bin", env, work


def test_the_installed_command_preprocesses_and_inspects_from_any_folder(installed):
    bin_dir, env, work = installed
    folder = work / "elsewhere"
    folder.mkdir()
    shutil.copy(REPO / "examples" / "data" / "chat_openai.jsonl", folder)
    preprocessed = run([bin_dir / "megatron-qwen", "preprocess", "--input", "chat_openai.jsonl", "--tokenizer", "qwen",
                        "--output-prefix", "data/sample", "--seq-length", "512", "--no-progress"], folder, env)
    assert preprocessed.stdout.startswith("wrote ") and "to data/sample_*" in preprocessed.stdout
    # python -v names each module file it loads: the inspection ran the installed package's files only
    inspected = run([bin_dir / "python", "-v", bin_dir / "megatron-qwen", "inspect", "data/sample", "--index", "0",
                     "--colour", "never"], folder, env)
    assert inspected.stdout.startswith("conversation 0 of ")
    loaded = {line.rsplit(" ", 1)[-1].strip("'") for line in inspected.stderr.splitlines()
              if line.startswith("# code object from ") or " matches " in line}
    ours = {path for path in loaded if f"{os.sep}megatron_qwen{os.sep}" in path}
    assert any(path.endswith(os.path.join("megatron_qwen", "cli", "inspect_dataset.py")) for path in ours), ours
    assert all(path.startswith(str(bin_dir.parent)) for path in ours), ours - {p for p in ours
                                                                            if p.startswith(str(bin_dir.parent))}


def test_the_installed_command_finds_a_shipped_recipe_by_name(installed):
    # the name is resolved before the flags are parsed: a recipe missing from the wheel would be refused (exit 2)
    bin_dir, env, work = installed
    result = subprocess.run([bin_dir / "megatron-qwen", "train", "--recipe", "qwen_14b_sft", "--help"], cwd=work,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: megatron-qwen train "), result.stderr
