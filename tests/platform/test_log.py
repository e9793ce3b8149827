"""Log lines carry the time; long loops report progress as lines when their output is not a terminal."""
import io
import re

from megatron_qwen.platform.log import Phases, Progress, stamped

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "


def test_every_line_gets_the_time():
    lines = stamped("first\nsecond").split("\n")
    assert [re.sub(TIME, "", line, count=1) for line in lines] == ["first", "second"]
    assert all(re.match(TIME, line) for line in lines)


def test_a_loop_writing_to_a_file_reports_lines_not_a_bar():
    out = io.StringIO()  # not a terminal
    with Progress("hf-to-mcore", "tensors read", total=3, interval=0.0, stream=out) as progress:
        for _ in range(3):
            progress.update(1, "note")
    lines = out.getvalue().splitlines()
    assert [re.sub(TIME, "", line) for line in lines] == [
        "hf-to-mcore: 1/3 tensors read in 0 s, note", "hf-to-mcore: 2/3 tensors read in 0 s, note",
        "hf-to-mcore: 3/3 tensors read in 0 s, note", "hf-to-mcore: 3/3 tensors read in 0 s"]
    assert "\r" not in out.getvalue()


def test_a_short_loop_says_nothing():
    out = io.StringIO()
    with Progress("preprocess", "conversations", interval=10.0, stream=out) as progress:
        progress.update(5)
    assert out.getvalue() == ""


def test_phases_report_each_duration_as_it_ends():
    reported = []
    phases = Phases(reported.append)
    phases.end("distributed init")
    phases.end("model build")
    assert [re.sub(r"\d+\.\d s$", "S", line) for line in reported] == [
        "start-up: distributed init S", "start-up: model build S"]


def test_the_first_phase_may_begin_with_the_process():
    reported = []
    Phases(reported.append, since_process_start=True).end("imports")
    Phases(reported.append).end("nothing")
    seconds = [float(re.search(r" ([\d.]+) s$", line).group(1)) for line in reported]
    assert seconds[0] > 0.0 and seconds[1] == 0.0  # this process has run for a while (pytest's own start-up)
