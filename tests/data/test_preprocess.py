"""The preprocessing run end to end: readable megatron-core datasets, bad input named by file and line,
rejects, gzip, identical output for any number of workers, and nothing under PREFIX after a failure
or a SIGKILL."""
import errno
import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_fixtures import REPO, SAMPLES, chat, write_jsonl
from megatron_qwen.cli import preprocess as preprocess_command
from megatron_qwen.data.chatml import ChatMLRenderer, Message, with_system_prompt
from megatron_qwen.data import writer as writer_module
from megatron_qwen.data.dataset_files import DatasetFilesError, OutputError, read_stats
from megatron_qwen.data.encode import EncodeSettings
from megatron_qwen.data import preprocess
from megatron_qwen.data.preprocess import InputError, PreprocessJob, run
from megatron_qwen.data.tokenizer import load_tokenizer

GOOD = chat(("user", "Hi"), ("assistant", "Hello!"))
BAD_ROWS = [  # (line as written, the reason the error must give)
    ('{"messages": [{"role": "user", "content": "Hi"}', "malformed JSON"),
    ('{"turns": []}', 'missing key: expected "messages"'),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', '"messages"[0] has no "content" key'),
    ('{"conversations": [{"from": "human", "value": "a"}, {"value": "b"}]}', '"conversations"[1] has no "from" key'),
    ('{"messages": [{"role": "function", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "\"messages\"[0] has unknown role 'function'"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     '"messages"[0] "content" is list, not a string'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}',
     '"messages"[1] "content" is NoneType, not a string'),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "unpaired surrogate"),
    ('[1, 2]', "expected a JSON object, got list"),
    # valid JSON that Python's json module cannot read: its RecursionError and its integer-length ValueError
    ('{"messages": ' + "[" * 10000 + "]" * 10000 + "}", "JSON nested deeper than Python reads"),
    ('{"messages": [{"role": "user", "content": "a", "n": ' + "9" * 5000 + '}, {"role": "assistant", "content": "b"}]}',
     "JSON integer longer than Python reads"),
]


def outputs_under(prefix):
    return sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name))


def dataset_bytes(prefix):
    return {name: (prefix.parent / name).read_bytes() for name in outputs_under(prefix) if not name.endswith(".json")}


def job(inputs, prefix, **overrides):
    return PreprocessJob(inputs=list(inputs), tokenizer="qwen", output_prefix=prefix, progress=False, **overrides)


def test_sample_data_round_trip(tmp_path):
    prefix = tmp_path / "out" / "sample"
    stats = run(job(SAMPLES, prefix, settings=EncodeSettings(loss_mask="assistant", seq_length=512)))
    assert outputs_under(prefix) == ["sample_loss_mask_document.bin", "sample_loss_mask_document.idx",
                                     "sample_stats.json", "sample_text_document.bin", "sample_text_document.idx"]
    tokens = IndexedDataset(f"{prefix}_text_document")
    mask = IndexedDataset(f"{prefix}_loss_mask_document")
    assert len(tokens) == len(mask) == 42
    assert np.array_equal(tokens.sequence_lengths, mask.sequence_lengths)
    assert tokens.document_indices.tolist() == mask.document_indices.tolist() == list(range(43))
    assert tokens[0].dtype == np.int32 and mask[0].dtype == np.uint8
    # each document is its conversation, rendered on its own
    renderer = ChatMLRenderer(load_tokenizer("qwen"))
    rows = [json.loads(line) for path in SAMPLES for line in path.read_text(encoding="utf-8").splitlines()]
    for index, row in enumerate(rows):
        messages = [Message(m["role"], m["content"]) for m in row["messages"]] if "messages" in row else \
            [Message({"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), m["value"]) for m in row["conversations"]]
        ids, loss_mask = renderer.render(with_system_prompt(messages))
        assert tokens[index].tolist() == ids and mask[index].tolist() == loss_mask
    assert stats == read_stats(prefix)
    assert stats["conversations"] == {"read": 42, "written": 42, "rejected": 0, "added_by_split": 0,
                                      "dropped_overlong": 0, "truncated": 0}
    assert stats["tokens"] == {"total": int(tokens.sequence_lengths.sum()),
                               "supervised": int(sum(mask[i].sum() for i in range(42)))}
    lengths = np.sort(tokens.sequence_lengths)
    assert stats["conversation_length"]["max"] == lengths[-1] and stats["conversation_length"]["min"] == lengths[0]
    assert stats["conversation_length"]["p50"] == int(np.percentile(lengths, 50, method="inverted_cdf"))
    assert stats["provenance"] == {
        "tokenizer": {"kind": "qwen", "vocab_file": "qwen.tiktoken", "vocab_size": 151851,
                      "sha256": "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"},
        "loss_mask": "assistant", "seq_length": 512, "system_prompt": "You are a helpful assistant.",
        "overlong": "truncate", "reasoning_history": "keep"}


@pytest.mark.parametrize("line, reason", BAD_ROWS)
def test_bad_row_fails_naming_file_line_and_reason_and_writes_nothing(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, line, GOOD])
    prefix = tmp_path / "bad"
    with pytest.raises(InputError) as error:
        run(job([path], prefix))
    assert str(error.value).startswith(f"{path}:3: ")
    assert reason in str(error.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: invalid UTF-8 at byte 43"):
        run(job([path], tmp_path / "bad"))


def test_skip_writes_rejects_with_reasons(tmp_path):
    lines = [GOOD, *[line for line, _ in BAD_ROWS], GOOD]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    prefix = tmp_path / "skip"
    stats = run(job([path], prefix, on_error="skip"))
    assert stats["conversations"]["read"] == len(lines)
    assert stats["conversations"]["written"] == 2 and stats["conversations"]["rejected"] == len(BAD_ROWS)
    rejects = [json.loads(line) for line in (tmp_path / "skip_rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rejects] == list(range(2, 2 + len(BAD_ROWS)))
    for reject, (line, reason) in zip(rejects, BAD_ROWS):
        assert reason in reject["reason"] and reject["file"] == str(path) and reject["row"] == line
    assert len(IndexedDataset(f"{prefix}_text_document")) == 2
    # a clean rerun replaces the dataset and removes the old rejects
    write_jsonl(path, [GOOD])
    assert run(job([path], prefix, on_error="skip"))["conversations"]["written"] == 1
    assert "skip_rejects.jsonl" not in outputs_under(prefix)


def test_gzip_input_gives_the_same_dataset(tmp_path):
    plain = SAMPLES[0]
    packed = tmp_path / "sample.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    run(job([plain], tmp_path / "plain"))
    run(job([packed], tmp_path / "packed"))
    assert list(dataset_bytes(tmp_path / "plain").values()) == list(dataset_bytes(tmp_path / "packed").values())


def many_conversations(path, count):
    sentences = [line for p in SAMPLES for line in p.read_text(encoding="utf-8").splitlines()]
    rows = []
    for i in range(count):
        turns = [("user", f"Question {i}: {json.loads(sentences[i % len(sentences)])}")]
        turns += [("assistant", "答案 " * (i % 17) + "done."), ("user", "thanks"), ("assistant", "café\u0301 " * (i % 5))]
        rows.append(chat(*turns) if i % 2 else {"conversations": [{"from": r, "value": c} for r, c in turns]})
    return write_jsonl(path, rows)


def test_one_and_two_workers_write_identical_bytes(tmp_path):
    path = many_conversations(tmp_path / "many.jsonl", 600)
    settings = EncodeSettings(loss_mask="qwen-finetune", seq_length=96)  # some get truncated
    one = run(job([path], tmp_path / "w1", settings=settings, workers=1, batch_bytes=4096))
    two = run(job([path], tmp_path / "w2", settings=settings, workers=2, batch_bytes=4096))
    assert one["conversations"]["truncated"] > 0
    named = ("files", "digests")  # keyed by file name, which holds the prefix
    assert {k: v for k, v in one.items() if k not in named} == {k: v for k, v in two.items() if k not in named}
    assert list(one["digests"]["sha256"].values()) == list(two["digests"]["sha256"].values())
    first, second = dataset_bytes(tmp_path / "w1"), dataset_bytes(tmp_path / "w2")
    assert len(first) == 4 and list(first.values()) == list(second.values())
    assert not list(tmp_path.glob(".*")), "a staging folder or batch file was left behind"


def test_copies_without_sendfile_give_the_same_bytes(tmp_path, monkeypatch):
    # Where sendfile cannot write to a file (it writes only to sockets outside Linux), batch files are
    # appended through a buffer instead; the datasets must not change.
    path = many_conversations(tmp_path / "many.jsonl", 200)
    run(job([path], tmp_path / "kernel", batch_bytes=4096))

    def no_sendfile(*args):
        raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    run(job([path], tmp_path / "buffered", batch_bytes=4096))
    kernel, buffered = dataset_bytes(tmp_path / "kernel"), dataset_bytes(tmp_path / "buffered")
    assert len(kernel) == 4 and list(kernel.values()) == list(buffered.values())


def bad_input(tmp_path) -> Path:
    path = many_conversations(tmp_path / "many.jsonl", 300)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[250] = '{"messages": []}'
    return write_jsonl(path, lines)


def test_bad_row_with_two_workers_stops_and_leaves_nothing(tmp_path):
    path = bad_input(tmp_path)
    with pytest.raises(InputError, match=rf"^{path}:251: empty conversation"):
        run(job([path], tmp_path / "bad", workers=2, batch_bytes=4096))
    assert os.listdir(tmp_path) == ["many.jsonl"]


def test_workers_end_on_sigterm_where_the_caller_only_records_it():
    # a caller whose SIGTERM handler only records (a trainer earlier in the same process) must not hand that handler
    # to the forked workers: the pool's terminate() sends them SIGTERM, and its join() waits for them to end
    previous = signal.signal(signal.SIGTERM, lambda number, frame: None)
    try:
        with multiprocessing.get_context("fork").Pool(1, initializer=preprocess._set_worker_encoder,
                                                      initargs=(None,)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_incomplete_dataset_is_refused(tmp_path):
    prefix = tmp_path / "d"
    run(job([SAMPLES[1]], prefix))
    read_stats(prefix)
    (tmp_path / "d_loss_mask_document.bin").write_bytes(b"")
    with pytest.raises(DatasetFilesError, match="incomplete"):
        read_stats(prefix)
    with pytest.raises(DatasetFilesError, match="missing"):
        read_stats(tmp_path / "nothing")


@pytest.mark.slow
def test_sigkill_mid_run_leaves_nothing_under_prefix(tmp_path):
    path = many_conversations(tmp_path / "big.jsonl", 40000)
    prefix = tmp_path / "out" / "killed"
    command = [sys.executable, str(REPO / "tools" / "preprocess_chatml.py"), "--input", str(path), "--tokenizer",
               "qwen", "--output-prefix", str(prefix), "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    staged = None
    deadline = time.time() + 90
    while time.time() < deadline and process.poll() is None:
        staged = next((p for p in prefix.parent.glob(".killed.partial-*/killed_text_document.bin")), None)
        if staged is not None and staged.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert process.poll() is None and staged is not None and staged.stat().st_size > 0, "the run ended too early"
    os.killpg(process.pid, signal.SIGKILL)  # the tool and its workers, mid-write
    process.wait()
    assert outputs_under(prefix) == []
    with pytest.raises(DatasetFilesError):
        read_stats(prefix)
    # the next run clears the dead run's staging folder and writes a complete dataset
    small = write_jsonl(tmp_path / "small.jsonl", [GOOD])
    subprocess.run([*command[:3], str(small), *command[4:]], env=env, check=True, capture_output=True)
    assert read_stats(prefix)["conversations"]["written"] == 1
    assert sorted(os.listdir(prefix.parent)) == outputs_under(prefix)


@pytest.mark.slow
def test_cli_reports_bad_input_and_exit_status(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, '{"messages": []}'])
    done = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_chatml.py"), "--input", str(path),
                           "--tokenizer", "qwen", "--output-prefix", str(tmp_path / "x"), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert f"error: {path}:2: empty conversation" in done.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("lines, overrides, message", [
    ([], {}, "no conversations (empty input)"),
    (["", "  "], {}, "no conversations (empty input)"),
    ([chat(("user", "word " * 300), ("assistant", "ok"))], {"settings": EncodeSettings(seq_length=100)},
     "of 1 read, 0 rejected and 1 dropped as longer than --seq-length 100 (--overlong truncate)"),
    (['{"messages": []}'], {"on_error": "skip"}, "of 1 read, 1 rejected and 0 dropped"),
])
def test_a_run_that_would_write_no_conversation_fails_naming_the_input(tmp_path, lines, overrides, message):
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(InputError) as error:
        run(job([path], tmp_path / "none", **overrides))
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_an_output_prefix_that_cannot_name_files_is_refused_before_anything_is_written(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=rf"^--output-prefix {tmp_path}/out/: ends in a path separator"):
        job([path], f"{tmp_path}/out/")  # it would write out_text_document.bin beside the folder
    for prefix in (tmp_path / "afile" / "x", tmp_path / "afile" / "deeper" / "x"):
        with pytest.raises(OutputError, match=rf"^--output-prefix {prefix}: {tmp_path / 'afile'} is a file"):
            job([path], prefix)
    assert sorted(os.listdir(tmp_path)) == ["afile", "in.jsonl"]


def fail_at_staging_folder(monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(path, *args, **kwargs):
        if ".partial-" in path.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def fail_mid_copy(monkeypatch):
    # the disk fills while a batch is appended: half of it lands in the staged .bin file
    real_append = writer_module._append

    def append(source, offset, count, target):
        real_append(source, offset, count // 2, target)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module, "_append", append)


def fail_at_stats_file(monkeypatch):
    def write_text(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("fail, reason", [
    (fail_at_staging_folder, "Read-only file system"),
    (fail_mid_copy, "No space left on device"),
    (fail_at_stats_file, "No space left on device"),
])
def test_a_failed_write_names_the_prefix_and_leaves_the_previous_dataset(tmp_path, monkeypatch, fail, reason):
    prefix = tmp_path / "out" / "chats"
    run(job([SAMPLES[1]], prefix))
    before = {name: (prefix.parent / name).read_bytes() for name in outputs_under(prefix)}
    bigger = many_conversations(tmp_path / "many.jsonl", 200)
    fail(monkeypatch)
    with pytest.raises(OutputError, match=rf"^--output-prefix {prefix}: cannot write the dataset \(.*{reason}"):
        run(job([bigger], prefix, batch_bytes=4096))
    monkeypatch.undo()
    assert sorted(os.listdir(prefix.parent)) == sorted(before), "a staging folder or a new file was left"
    assert {name: (prefix.parent / name).read_bytes() for name in before} == before
    read_stats(prefix)


def test_workers_are_capped_to_the_batches_of_input(tmp_path, capsys):
    path = many_conversations(tmp_path / "few.jsonl", 20)  # one batch of work
    run(job([path], tmp_path / "capped", workers=1000))
    assert "--workers 1000: 1 process(es) encode, as many as there are batches of input" in capsys.readouterr().err
    run(job([path], tmp_path / "one"))
    assert list(dataset_bytes(tmp_path / "capped").values()) == list(dataset_bytes(tmp_path / "one").values())


def test_cli_exits_1_naming_an_empty_input(tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    assert preprocess_command.main(["--input", str(path), "--tokenizer", "qwen", "--output-prefix", str(tmp_path / "x"),
                      "--no-progress"]) == 1
    assert f"error: {path}: no conversations (empty input)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["empty.jsonl"]
