"""What job code wrote, after the fact: reading a job's log records from Redis
(``cluster logs``, ``cluster submit --logs``) and keeping those of a private local cluster,
whose Redis ends with its run, in a local file.

A record is written again when a worker retries a commit whose reply was lost; readers here
drop such copies (they are byte for byte the same).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .broker import Broker
from .entries import LogRecord

LOCAL_DIR = Path("~/.local/state/cluster/logs")
LOCAL_KEPT = 50  # job log files kept locally; the oldest go first


class Follower:
    """Records of one job as they arrive, each once."""

    def __init__(self, broker: Broker, jid: str) -> None:
        self.broker = broker
        self.jid = jid
        self.cursor = "0-0"
        self.seen: set[bytes] = set()

    def poll(self) -> list[LogRecord]:
        """New records since the last call (all of them, in pages)."""
        records: list[LogRecord] = []
        while True:
            page = self.broker.read_logs(self.jid, self.cursor)
            for mid, raw in page:
                self.cursor = mid
                if raw not in self.seen:
                    self.seen.add(raw)
                    records.append(LogRecord.from_json(raw))
            if len(page) < 1000:
                return records


def select(records: Iterable[LogRecord], unit: int | None = None, host: str | None = None,
           failed: bool = False) -> Iterator[LogRecord]:
    for r in records:
        if unit is not None and r.unit != unit:
            continue
        if host is not None and r.host != host:
            continue
        if failed and r.kind == "ok":
            continue
        yield r


def follow(broker: Broker, jid: str, show: Callable[[LogRecord], None], forever: bool,
           interval: float = 0.5, clock: Callable[[], float] = time.monotonic) -> int:
    """Show the job's records; with ``forever``, keep showing new ones until the job is no
    longer running. Returns how many were shown."""
    follower = Follower(broker, jid)
    shown = 0
    while True:
        for record in follower.poll():
            show(record)
            shown += 1
        if not forever or not broker.job_exists(jid):
            for record in follower.poll():  # written just before the job ended
                show(record)
                shown += 1
            return shown
        deadline = clock() + interval
        while clock() < deadline:
            time.sleep(0.05)


def local_dir() -> Path:
    return Path(os.environ.get("CLUSTER_LOG_DIR") or LOCAL_DIR).expanduser()


def save_local(jid: str, records: list[LogRecord]) -> Path | None:
    """Keep the records of a local run (best effort: a read-only home is no error)."""
    directory = local_dir()
    path = directory / f"{jid}.jsonl"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for record in records:
                f.write(record.to_json() + b"\n")
        old = sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        for stale in old[:max(0, len(old) - LOCAL_KEPT)]:
            stale.unlink(missing_ok=True)
    except OSError:
        return None
    return path


def load_local(jid: str) -> list[LogRecord] | None:
    """The records a local run of ``jid`` kept, or None."""
    if not jid.replace("-", "").isalnum():
        return None
    path = local_dir() / f"{jid}.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    try:
        return [LogRecord.from_json(line) for line in lines if line.strip()]
    except (ValueError, KeyError, json.JSONDecodeError):
        return None
