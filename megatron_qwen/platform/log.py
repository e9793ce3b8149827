"""Log lines: the time on each line, the durations of start-up's phases, and progress through long loops.

Every line the trainer prints starts with the local time and its UTC offset (``2026-12-08T04:00:26+00:00``), so
that lines of many nodes' logs and of a job's restarts can be put in order. A long loop (a conversion's tensors,
a preprocessing's conversations) shows a bar on a terminal and, when its output goes to a file, a line at most
every ``interval`` seconds, which a log file keeps readable (a bar's carriage returns would make one long line).

Importing this module imports nothing heavy.
"""
from __future__ import annotations

import datetime
import sys
import time


def timestamp() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def stamped(text: str) -> str:
    """``text`` with the time before each of its lines."""
    now = timestamp()
    return "\n".join(f"{now} {line}" for line in text.split("\n"))


class Phases:
    """The durations of consecutive phases (start-up's), each reported as it ends through ``report``."""

    def __init__(self, report, since_process_start: bool = False):
        """``since_process_start``: the first phase began when the process did (its imports), not now."""
        self.report = report
        self.last = time.perf_counter()
        if since_process_start:
            import psutil

            self.last -= time.time() - psutil.Process().create_time()

    def end(self, name: str) -> None:
        """The phase ``name`` ended now (it began where the previous one ended)."""
        now = time.perf_counter()
        self.report(f"start-up: {name} {now - self.last:.1f} s")
        self.last = now


class Progress:
    """Counts through a loop of ``total`` items (``None``: unknown): a bar on a terminal, else a line every
    ``interval`` seconds and, when there was one, a last one at the end (a short loop says nothing); nothing when
    not ``enabled``."""

    def __init__(self, what: str, unit: str, total: int | None = None, interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.what, self.unit, self.total, self.interval = what, unit, total, interval
        self.stream = stream or sys.stderr
        self.count, self.started = 0, time.perf_counter()
        self.last_line, self.printed = self.started, False
        self.bar = None
        self.lines = enabled and not self.stream.isatty()
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True, file=self.stream)

    def update(self, count: int = 1, note: str = "") -> None:
        self.count += count
        if self.bar is not None:
            self.bar.update(count)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
        elif self.lines and time.perf_counter() - self.last_line >= self.interval:
            self._line(note)

    def _line(self, note: str) -> None:
        self.last_line, self.printed = time.perf_counter(), True
        done = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        elapsed = self.last_line - self.started
        print(stamped(f"{self.what}: {done} {self.unit} in {elapsed:.0f} s" + (f", {note}" if note else "")),
              file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.printed:
            self._line(note)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
