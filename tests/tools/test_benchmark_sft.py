"""tools/benchmark_sft.py runs on the CPU with the tiny preset: a smoke test of both rows, padded and packed.

Not a timing: it checks that the script trains both rows through to a well-formed table with positive, finite
figures, and that the two rows saw the same data regime. The trainer counts non-padding tokens from its
collated rows, the peer counts the non-padding ids in the tensors it actually fed to transformers: equal counts
(and equal supervised-token counts) over all updates mean the same conversations, padded or packed alike.
Both rows start at the loss of a near-uniform prediction over the 151,936 embedding rows, ln(151936) = 11.93,
which a loss summed instead of divided by the supervised-token count, or scaled wrongly, would miss.
"""
import json
import math

import pytest

from workers import REPO, run_python

pytestmark = pytest.mark.slow  # the benchmark's processes

SCRIPT = REPO / "tools" / "benchmark_sft.py"
COMMON = [
    "--seq-length", "128", "--global-batch-size", "4", "--micro-batch-size", "2", "--steps", "1", "--warmup", "1",
    "--conversations", "48", "--precision", "fp32",  # --precision goes to the trainer's configuration
]
HEADER = [
    "row", "optimizer", "median step (s)", "tokens/s/GPU", "TFLOP/s/GPU", "MFU (%)", "peak memory (GiB)", "tokens",
    "supervised tokens", "first loss", "last loss",
]
NUMERIC = HEADER[2:]
UNIFORM_LOSS = math.log(151936)


def tables(stdout: str) -> list[list[dict]]:
    """Every results table in the output, as rows of column -> cell."""
    lines = stdout.splitlines()
    found = []
    for index, line in enumerate(lines):
        if line.startswith("| row |"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            assert header == HEADER, line
            assert lines[index + 1] == "|" + "---|" * len(HEADER)
            rows = []
            for row_line in lines[index + 2 :]:
                if not row_line.startswith("|"):
                    break
                cells = [cell.strip() for cell in row_line.strip("|").split("|")]
                assert len(cells) == len(HEADER), row_line
                rows.append(dict(zip(HEADER, cells)))
            found.append(rows)
    return found


def ratios(stdout: str) -> list[float]:
    return [float(line.split(":")[1]) for line in stdout.splitlines() if line.startswith("ours/peer tokens/s:")]


REGIMES = ("pad", "pack", "padfree")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """One run of the script over all three regimes: (its output, its JSON report)."""
    report = tmp_path_factory.mktemp("benchmark") / "report.json"
    done = run_python(SCRIPT, "--rows", *REGIMES, "--preset", "tiny", *COMMON, "--json", report, timeout=400)
    return done.stdout, json.loads(report.read_text())


@pytest.fixture(scope="module")
def runs(benchmark):
    """Per regime: (its results tables, its runs in the report), in the order the script ran them."""
    stdout, report = benchmark
    found = tables(stdout)
    assert len(found) == len(report["runs"]) == len(REGIMES)  # one table per regime and preset
    assert [run["regime"] for run in report["runs"]] == list(REGIMES)
    return {rows: ([table for table, run in zip(found, report["runs"]) if run["regime"] == rows],
                   [run for run in report["runs"] if run["regime"] == rows]) for rows in REGIMES}


@pytest.mark.parametrize("rows", REGIMES)
def test_both_rows_train_to_a_well_formed_table_of_positive_finite_figures(runs, rows):
    for table, run in zip(*runs[rows]):
        assert [row["row"] for row in table] == ["ours", "peer"]
        for row in table:
            for column in NUMERIC:
                value = float(row[column])
                assert math.isfinite(value) and value > 0, (row["row"], column, value)
            assert float(row["first loss"]) == pytest.approx(UNIFORM_LOSS, abs=0.15)
        # on the CPU the megatron fallback keeps torch's default AdamW (no fused switch), like the peer
        assert table[0]["optimizer"] == table[1]["optimizer"] == "torch.optim.adamw.AdamW (for-loop)"
        ours, peer = (float(row["tokens/s/GPU"]) for row in table)
        assert run["ours_over_peer_tokens_per_s"] == pytest.approx(ours / peer, rel=1e-3)


def test_the_report_names_what_ran(benchmark):
    stdout, report = benchmark
    assert ratios(stdout) == pytest.approx([run["ours_over_peer_tokens_per_s"] for run in report["runs"]], rel=1e-3)
    assert report["versions"]["megatron-core"] == "0.16.1" and report["versions"]["transformers"] != "not installed"
    assert report["matmul_bf16_tflops"] > 0
    assert "--rows pad pack padfree" in report["command"] and report["device"].startswith("CPU")


@pytest.mark.parametrize("rows", REGIMES)
def test_both_rows_process_the_same_non_padding_and_supervised_tokens(runs, rows):
    for ours, peer in runs[rows][0]:
        assert int(ours["tokens"]) == int(peer["tokens"])
        assert int(ours["supervised tokens"]) == int(peer["supervised tokens"])
        assert 0 < int(ours["supervised tokens"]) < int(ours["tokens"])


def test_packed_rows_hold_more_tokens_than_padded_rows_in_both_rows(runs):
    # same number of rows per update: packing puts several conversations into a row, padding one
    padded, packed = (runs[rows][0][0] for rows in ("pad", "pack"))
    for pad_row, pack_row in zip(padded, packed):
        assert int(pack_row["tokens"]) > 1.5 * int(pad_row["tokens"])


def test_padfree_trains_the_padded_conversations_from_fuller_rows(runs):
    # the same conversations as padded rows (same seed, same count per update), packed: equal token counts in
    # both rows, a higher share of non-padding positions
    padded, padfree = (runs[rows][0][0] for rows in ("pad", "padfree"))
    for pad_row, padfree_row in zip(padded, padfree):
        assert (pad_row["tokens"], pad_row["supervised tokens"]) == (padfree_row["tokens"], padfree_row["supervised tokens"])
    for regime in ("pad", "padfree"):  # and both rows trained on the same number of rows
        ours, peer = runs[regime][1][0]["rows"]
        assert ours["rows"] == peer["rows"] > 0
    fill = {rows: runs[rows][1][0]["row_fill"] for rows in ("pad", "padfree")}
    assert 0 < fill["pad"] < fill["padfree"] <= 1
