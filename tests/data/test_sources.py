"""Parquet inputs (``data/sources.py``), and inputs that cannot be read at all.

The reference for a Parquet file is the JSON Lines file of the same rows: both must give the same dataset,
byte for byte. Parquet gives every struct the union of the fields of all rows, so the files written here
are checked to hold such null fields (tools with each other's parameters, user messages with
``tool_calls``) before they are compared.
"""
import gzip
import json
import os
import sys

import pyarrow
import pyarrow.parquet
import pytest

from data_fixtures import REPO, SAMPLES, chat, dataset_contents, write_jsonl
from megatron_qwen.data.preprocess import InputError, PreprocessJob, run

GOOD = chat(("user", "Hi"), ("assistant", "Hello!"))


def weather_tool(parameter: str) -> dict:
    return {"type": "function", "function": {"name": f"by_{parameter}", "parameters": {
        "type": "object", "properties": {parameter: {"type": "string"}}, "required": [parameter]}}}


# Two rows whose tools have different parameters, and a reply with a call next to replies without.
UNIFIED_ROWS = [
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function",
                                   "function": {"name": "by_city", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "content": "rain"},
                  {"role": "assistant", "content": "Rain in Oslo."}],
     "tools": [weather_tool("city")]},
    {"messages": [{"role": "user", "content": "Weather at 60N 10E?"}, {"role": "assistant", "content": "No idea."}],
     "tools": [weather_tool("coordinates")]},
]


def job(inputs, prefix, **overrides):
    return PreprocessJob(inputs=list(inputs), tokenizer="qwen", output_prefix=prefix, progress=False, **overrides)


def table(rows) -> pyarrow.Table:
    # Table.from_pylist would take its columns from the first row alone.
    return pyarrow.Table.from_struct_array(pyarrow.array(rows))


def write_parquet(path, rows):
    pyarrow.parquet.write_table(table(rows), path)
    return path


def consecutive_parquet_files(folder, rows) -> list:
    """The rows in order, in as few Parquet files as hold them (rows whose types conflict, such as
    arguments written as a string and as an object, cannot share a file)."""
    groups = [[]]
    for row in rows:
        try:
            table(groups[-1] + [row])
            groups[-1].append(row)
        except pyarrow.ArrowException:
            groups.append([row])
    return [write_parquet(folder / f"part{number}.parquet", group) for number, group in enumerate(groups)]


def test_parquet_files_give_the_dataset_of_the_same_rows_as_json_lines(tmp_path):
    jsonl_rows = [json.loads(line) for path in [*SAMPLES, REPO / "examples" / "data" / "chat_tools.jsonl"]
                  for line in path.read_text(encoding="utf-8").splitlines()]
    rows = jsonl_rows + UNIFIED_ROWS
    parquet = consecutive_parquet_files(tmp_path, rows)
    unified = pyarrow.parquet.read_table(parquet[-1]).to_pylist()
    assert unified[1]["tools"][0]["function"]["parameters"]["properties"]["city"] is None
    assert unified[1]["messages"][0]["tool_calls"] is None
    reference = write_jsonl(tmp_path / "rows.jsonl", rows)

    from_parquet = run(job(parquet, tmp_path / "parquet"))
    from_jsonl = run(job([reference], tmp_path / "jsonl"))
    assert dataset_contents(tmp_path / "parquet") == dataset_contents(tmp_path / "jsonl")
    assert from_parquet["conversations"]["written"] == len(rows)
    different = {"inputs": None, "files": None, "digests": None}  # the paths
    assert {**from_parquet, **different} == {**from_jsonl, **different}
    assert list(from_parquet["digests"]["sha256"].values()) == list(from_jsonl["digests"]["sha256"].values())


def test_a_bad_parquet_row_is_named_by_its_row_number(tmp_path):
    no_reply = chat(("user", "Hi"))
    path = write_parquet(tmp_path / "in.parquet", [GOOD, GOOD, no_reply, GOOD])
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=rf"^{path}:3: no assistant turn$"):
        run(job([path], tmp_path / "out" / "bad"))
    assert os.listdir(tmp_path / "out") == []

    prefix = tmp_path / "skip"
    stats = run(job([path], prefix, on_error="skip"))
    assert stats["conversations"]["written"] == 3
    (reject,) = [json.loads(line) for line in (tmp_path / "skip_rejects.jsonl").read_text().splitlines()]
    assert (reject["file"], reject["line"], reject["reason"]) == (str(path), 3, "no assistant turn")
    assert json.loads(reject["row"]) == no_reply


def unreadable_inputs(folder):
    """(file, what the error must say) for inputs that are not readable as what they start like."""
    jsonl = folder / "good.jsonl"
    write_jsonl(jsonl, [GOOD] * 3000)
    broken_gzip = folder / "cut.jsonl.gz"
    compressed = gzip.compress(jsonl.read_bytes())
    broken_gzip.write_bytes(compressed[:len(compressed) // 2])
    broken_parquet = folder / "cut.parquet"
    whole = write_parquet(folder / "whole.parquet", [GOOD]).read_bytes()
    broken_parquet.write_bytes(whole[:len(whole) // 2])
    no_conversations = write_parquet(folder / "text.parquet", [{"text": "Hi", "id": 1}])
    binary_tools = write_parquet(folder / "binary.parquet", [{**GOOD, "tools": b"\x00"}])
    return [
        (broken_gzip, rf"^{broken_gzip}: unreadable gzip file after line \d+: "),
        (broken_parquet, rf"^{broken_parquet}: unreadable Parquet file: "),
        (no_conversations, rf'^{no_conversations}: no "messages" or "conversations" column \(it has: text, id\)$'),
        (binary_tools, rf"^{binary_tools}:1: not a JSON value: "),
    ]


def test_unreadable_inputs_are_named_and_nothing_is_written(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for number, (path, message) in enumerate(unreadable_inputs(inputs)):
        out = tmp_path / f"out{number}"
        out.mkdir()
        with pytest.raises(InputError, match=message):
            run(job([inputs / "good.jsonl", path], out / "data"))
        assert os.listdir(out) == [], path


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "in.parquet", [GOOD])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=rf"^{path}: reading Parquet needs pyarrow \(pip install pyarrow\)$"):
        run(job([path], tmp_path / "data"))
