"""What a worker's job code writes, caught per unit: stdout and stderr at the file-descriptor
level (so C extensions and subprocesses are caught too) and records of ``logging``.

A worker points its descriptors 1 and 2 at two anonymous files for its whole life and keeps
the originals for its own log lines; after each unit it takes what the files hold (at most
``limit`` bytes of each stream, the rest replaced by a marker) and empties them. A unit that
writes nothing costs two ``fstat`` calls.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import TextIO

DEFAULT_LIMIT = 64 * 1024  # bytes of each stream kept per unit


def truncated(data: bytes, size: int, limit: int) -> str:
    """``data`` (the first bytes of ``size``) as text, with a marker for what was cut."""
    text = data[:limit].decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n[... {size - limit} more bytes not kept: the limit is {limit} per unit]\n"
    return text


def is_ours(record: logging.LogRecord) -> bool:
    return record.name == "cluster" or record.name.startswith("cluster.")


class _Records(logging.Handler):
    """``logging`` records of job code (not of ``cluster``), formatted, up to a limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.lines: list[str] = []
        self.size = 0
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.addFilter(lambda record: not is_ours(record))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        self.size += len(line.encode())
        if self.size <= self.limit:
            self.lines.append(line)

    def take(self) -> str:
        text = "".join(self.lines)
        if self.size > self.limit:
            text += f"[... {self.size - len(text.encode())} more bytes of log records not kept: " \
                    f"the limit is {self.limit} per unit]\n"
        self.lines, self.size = [], 0
        return text


class Capture:
    """Installed once per worker process; ``take()`` after each unit. ``records`` is to be
    added to the root logger (after the worker's own handler, which must pass only
    ``cluster``'s records: ``is_ours``)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.files = {"stdout": tempfile.TemporaryFile(), "stderr": tempfile.TemporaryFile()}
        self.records = _Records(limit)
        self.original_stderr: TextIO | None = None

    def install(self) -> TextIO:
        """Point fds 1 and 2 at the capture files; returns a stream on the original stderr,
        for the worker's own log lines."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.original_stderr = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(self.files["stdout"].fileno(), 1)
        os.dup2(self.files["stderr"].fileno(), 2)
        return self.original_stderr

    def take(self) -> dict[str, str]:
        """What job code wrote since the last call, by stream (only streams that got some)."""
        sys.stdout.flush()
        sys.stderr.flush()
        taken = {}
        for stream, file in self.files.items():
            size = os.fstat(file.fileno()).st_size
            if size:
                taken[stream] = truncated(os.pread(file.fileno(), self.limit, 0), size,
                                          self.limit)
                os.ftruncate(file.fileno(), 0)
                os.lseek(1 if stream == "stdout" else 2, 0, os.SEEK_SET)
        if self.records.lines or self.records.size:
            taken["log"] = self.records.take()
        return taken
