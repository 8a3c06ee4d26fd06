"""Where ``--output`` goes: its path, with placeholders, checked before the job runs, and the
write at the end of the run, which never loses the result.

Placeholders, expanded once per run: ``{job}`` (the job file's name without ``.py``),
``{date}`` (``YYYY-MM-DD``) and ``{time}`` (``HHMMSS``), both in local time at the start of the
command (a nightly cron run at 02:15 is named after its own night, whatever the offset to UTC),
and ``{id}``, the job's id (a resumed job keeps the id it started with). ``{{`` and ``}}`` are
braces. ``{id}`` is known only once the job is open, so it may appear in the file's name but
not in its directory, which must exist before the job runs.

The coordinator calls ``write`` after gather, and removes the job from Redis only when it
returns: a failed write leaves the job (and its result, when Redis could keep it) for a re-run.
"""

from __future__ import annotations

import os
import string
import time
from pathlib import Path
from typing import Any

from . import output
from .errors import OutputFailed, ResultMisfit, UsageError

PLACEHOLDERS = ("job", "date", "time", "id")
CHECK_ID = "0" * 12  # a job id's shape (12 hex digits): the path checked before the run


class Destination:
    """An ``--output`` path for one run; after ``write``, ``written`` is the file written and
    ``misfit`` says why it is not the one asked for (None when it is)."""

    def __init__(self, template: str, job: str, now: float | None = None) -> None:
        self.template = template
        self.job = job
        self.pieces = _parse(template)
        when = time.localtime(now)
        self.values = {"job": job, "date": time.strftime("%Y-%m-%d", when),
                       "time": time.strftime("%H%M%S", when)}
        self.written: Path | None = None
        self.misfit: str | None = None

    def path(self, jid: str) -> str:
        """The path for the job ``jid``."""
        values = {**self.values, "id": jid}
        return "".join(text + (values[name] if name else "") for text, name in self.pieces)

    def check(self) -> None:
        """Refuse, before the job runs, a path that could not be written (``UsageError``)."""
        if "\0" in os.path.dirname(self.path("\0")):
            raise UsageError(f"--output {self.template}: {{id}} is known only once the job "
                             "starts; use it in the file's name, not in a directory")
        output.check_path(self.path(CHECK_ID))

    def write(self, value: Any, jid: str, not_kept: str | None) -> None:
        """Write ``value`` for job ``jid``. ``not_kept`` is None when the coordinator kept the
        value in Redis for a re-run, else why not: then a failed write saves it to another file.
        Raises ``OutputFailed`` naming the file, the error and where the result is."""
        path = self.path(jid)
        target = output.fitting(path, value)
        try:
            self.written = output.write(path, value)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the result must not be lost
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                f"{type(exc).__name__}: {exc}"
            raise OutputFailed(str(target), error, self.rescue(value, jid, not_kept)) from None
        self.misfit = output.misfit(path, value) if target != Path(path) else None

    def check_written(self, jid: str) -> None:
        """``ResultMisfit`` when the result was written, but not to the file asked for."""
        if self.misfit and self.written:
            raise ResultMisfit(self.path(jid), self.misfit, str(self.written))

    def rescue(self, value: Any, jid: str, not_kept: str | None) -> str:
        """Where the result is after a failed write, in words."""
        if not_kept is None:
            return (f"the result is kept in Redis with job {jid} for --keep hours: run the "
                    f"command again with --resume {jid} (a re-run of the same command resumes "
                    "it too) to write it without computing it again")
        try:
            saved = output.keep(f"{self.job}-{jid}", value)
        except Exception as exc:  # noqa: BLE001 - said, with the reason it was not kept
            return (f"the result is lost: {not_kept}, and saving it elsewhere failed too "
                    f"({type(exc).__name__}: {exc})")
        return f"the result was saved to {saved} instead ({not_kept})"


def _parse(template: str) -> list[tuple[str, str | None]]:
    """(text, placeholder or None) pieces of ``template``; ``UsageError`` for an unknown
    placeholder, a format spec or an unmatched brace."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"--output {template}: {exc} (write {{{{ or }}}} for a brace)") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in PLACEHOLDERS or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"
            raise UsageError(f"--output {template}: unknown placeholder {shown}; use "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (and {{{{ or "
                             "}} for a brace)")
    return [(text, name) for text, name, _, _ in parsed]
