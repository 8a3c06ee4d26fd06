"""Progress of a run: a live bar on a terminal, plain lines at a modest interval otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from tqdm import tqdm


class Reporter(Protocol):
    def update(self, done: int, total: int | None, reissued: int) -> None: ...

    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


class NoReporter:
    """No progress; lines (``--logs``) still go to stderr."""

    def update(self, done: int, total: int | None, reissued: int) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Bar:
    """tqdm bar: done / total, rate, ETA, reissued."""

    def __init__(self, stream: TextIO) -> None:
        self.bar = tqdm(total=None, unit="unit", file=stream, dynamic_ncols=True, leave=False)
        self.last = 0.0

    def update(self, done: int, total: int | None, reissued: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and (total is None or done < total):
            return
        self.last = now
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(f"{reissued} reissued", refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        self.bar.write(line, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


class Lines:
    """One line every ``interval`` seconds, for logs and cron mail."""

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self.next = self.started + interval

    def update(self, done: int, total: int | None, reissued: int) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        rate = done / max(now - self.started, 1e-9)
        of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
        eta = f", ETA {(total - done) / rate:.0f} s" if total and rate > 0 else ""
        print(f"progress: {done}{of} units, {rate:.1f} units/s{eta}, {reissued} reissued",
              file=self.stream, flush=True)

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


def reporter(mode: str, stream: TextIO = sys.stderr) -> Bar | Lines | None:
    """``auto`` picks a bar on a terminal and lines otherwise; ``none`` reports nothing."""
    if mode == "none":
        return None
    if mode == "bar" or (mode == "auto" and stream.isatty()):
        return Bar(stream)
    return Lines(stream)
