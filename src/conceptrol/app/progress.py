"""One progress display per pass: a bar on a terminal, plain lines every few jobs in logs (CI, cluster jobs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LINES = 20  # about this many progress lines per pass when stderr is not a terminal
SECONDS = 60.0  # and at least one a minute


class JobProgress:
    """Jobs done of `total`, with elapsed time and an estimate of the time left."""

    def __init__(self, what: str, stream: TextIO | None = None, interactive: bool | None = None,
                 unit: str = "job") -> None:
        self.what, self.total, self.done, self.unit = what, 0, 0, unit
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.bar: tqdm | None = None
        self.began = self.last_line = time.monotonic()
        self.every = 1

    def start(self, total: int) -> None:
        """The pass knows how many jobs it has: show the bar (or the first line)."""
        self.total, self.done, self.every = total, 0, max(1, total // LINES)
        self.began = self.last_line = time.monotonic()
        if self.interactive:
            self.bar = tqdm(total=total, desc=self.what, unit=self.unit, file=self.stream, dynamic_ncols=True)
        elif total:
            print(f"conceptrol: {self.what}: {total} {self.unit}s to do", file=self.stream, flush=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if self.done % self.every == 0 or self.done == self.total or now - self.last_line >= SECONDS:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """'conceptrol: generate 12/120 jobs (10%), 0:01:02 elapsed, about 0:09:18 left'."""
        elapsed = (now or time.monotonic()) - self.began
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta = tqdm.format_interval(left) if self.done else "?"
        percent = 100 * self.done / self.total if self.total else 100
        return (f"conceptrol: {self.what} {self.done}/{self.total} {self.unit}s ({percent:.0f}%), "
                f"{tqdm.format_interval(elapsed)} elapsed, about {eta} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
