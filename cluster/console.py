"""The lines ``cluster`` itself writes to stderr: progress, the summary, ``result written to``,
``resumed job ...`` and ``cluster: error: ...``.

On a terminal they are written as they are. Anywhere else (a log file, cron mail, CI) each one
starts with the time in UTC and the job id, so that the lines of many runs can be told apart
and grepped::

    2026-11-28T09:30:00Z job=3f9a0c12d4e1 progress: 120/400 (30%) units, 41.0 units/s, ...

(``job=-`` until the job has an id). A block quoted under a line (a job's traceback, what its
unit wrote) is written as it is, as a traceback under a log line is. Warnings from ``logging``
carry their own time.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ job=\S+ ", re.MULTILINE)


def utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 in UTC, to the second: 2026-11-28T09:30:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def unstamped(text: str) -> str:
    """``text`` with the stamps taken off its lines."""
    return STAMP.sub("", text)


class Console:
    """Lines to ``stream`` (default: whatever ``sys.stderr`` is when writing), stamped unless
    it is a terminal (or as ``stamped`` says). ``job`` goes into the stamps once known."""

    def __init__(self, stream: TextIO | None = None, *, stamped: bool | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self._stream = stream
        self._stamped = stamped
        self.now = now
        self.job: str | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def stamped(self) -> bool:
        if self._stamped is not None:
            return self._stamped
        try:
            return not self.stream.isatty()
        except (AttributeError, ValueError):  # closed, or not a real stream
            return True

    def stamp(self) -> str:
        """What starts a line now: ``2026-11-28T09:30:00Z job=ID `` ("" on a terminal)."""
        return f"{utc(self.now())} job={self.job or '-'} " if self.stamped else ""

    def line(self, text: str, detail: str = "") -> None:
        """Write ``text``, each of its lines stamped, then ``detail`` as it is."""
        stamp = self.stamp()
        out = "".join(f"{stamp}{line}\n" for line in text.splitlines() or [""])
        if detail.strip():
            out += detail.rstrip() + "\n"
        self.stream.write(out)
        self.stream.flush()


STDERR = Console()
"""The process's stderr. Its job id is set by the progress reporter when the coordinator has
one (``progress``), and by the run's recorder at the end (``recorder``)."""


def say(text: str, detail: str = "") -> None:
    """A line (and a block under it) on stderr, stamped unless stderr is a terminal."""
    STDERR.line(text, detail)
