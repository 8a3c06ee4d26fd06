"""Progress of a run: a live bar on a terminal, plain lines at a modest interval otherwise.

Lines go through a ``console.Console``: off a terminal each one starts with the time and the
job id, which the reporter learns from ``begin``.
"""

from __future__ import annotations

import time
from typing import Protocol, TextIO

from tqdm import tqdm

from .console import STDERR, Console


class Reporter(Protocol):
    def begin(self, jid: str, recorded: int | None, total: int | None) -> None:
        """The job has an id; ``recorded`` is not None when it was resumed with that many
        units already recorded (of ``total``, when known)."""

    def update(self, done: int, total: int | None, reissued: int) -> None: ...

    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


def resumed_line(jid: str, recorded: int, total: int | None) -> str:
    """``resumed job ID: N of M units already recorded`` (``N units`` while M is unknown)."""
    of = f" of {total}" if total is not None else ""
    return f"resumed job {jid}: {recorded}{of} units already recorded"


def _console(out: Console | TextIO) -> Console:
    return out if isinstance(out, Console) else Console(out)


class NoReporter:
    """No progress; lines (``--logs``, the resumed line) still go to stderr."""

    def __init__(self, out: Console | TextIO = STDERR) -> None:
        self.out = _console(out)

    def begin(self, jid: str, recorded: int | None, total: int | None) -> None:
        self.out.job = jid
        if recorded is not None:
            self.write(resumed_line(jid, recorded, total))

    def update(self, done: int, total: int | None, reissued: int) -> None:
        pass

    def write(self, line: str) -> None:
        self.out.line(line)

    def close(self) -> None:
        pass


class Bar(NoReporter):
    """tqdm bar: done / total, rate, ETA, reissued."""

    def __init__(self, out: Console | TextIO = STDERR) -> None:
        super().__init__(out)
        self.bar = tqdm(total=None, unit="unit", file=self.out.stream, dynamic_ncols=True,
                        leave=False)
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
        self.bar.write(self.out.stamp() + line, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


class Lines(NoReporter):
    """One line every ``interval`` seconds, for logs and cron mail."""

    def __init__(self, out: Console | TextIO = STDERR, interval: float = 10.0) -> None:
        super().__init__(out)
        self.stream = self.out.stream
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
        self.write(f"progress: {done}{of} units, {rate:.1f} units/s{eta}, {reissued} reissued")


def reporter(mode: str, out: Console = STDERR) -> NoReporter:
    """``auto`` picks a bar on a terminal and lines otherwise; ``none`` reports no progress
    (but still writes lines)."""
    if mode == "none":
        return NoReporter(out)
    if mode == "bar" or (mode == "auto" and out.stream.isatty()):
        return Bar(out)
    return Lines(out)
