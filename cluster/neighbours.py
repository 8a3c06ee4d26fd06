"""Private local clusters on one machine see each other.

- ``RunLock``: a local run of a job holds a lock file (``flock``, released when its process
  ends, however it ends) named after the job, so a second local run of the same job is refused,
  waits or replaces the first (``--overlap``), as on a running cluster.
- ``share_cpus``: each local cluster records the CPUs its workers are pinned to; the next one
  pins its workers to the CPUs no live local cluster holds, and when there are none left, runs
  them unpinned, sharing the CPUs (it says so, in both cases).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psutil

from .errors import AlreadyRunning, JobTimeout

log = logging.getLogger("cluster.local")

STATE = Path("~/.local/state/cluster")
REPLACE_WAIT_S = 30.0  # how long a replaced local run may take to stop


def state_dir() -> Path:
    return Path(os.environ.get("CLUSTER_STATE_DIR") or STATE).expanduser()


class RunLock:
    """The lock of one job's local runs; held by this process once ``acquire`` returned."""

    def __init__(self, name: str, directory: Path | None = None) -> None:
        directory = directory or state_dir() / "locks"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self, policy: str, deadline: float,
                clock: Callable[[], float] = time.monotonic) -> None:
        signalled = 0.0
        while not self._try():
            holder = self.holder()
            if policy == "forbid":
                raise AlreadyRunning(f"this job already runs on this machine's private local "
                                     f"cluster: pid {holder.get('pid', '?')}, started "
                                     f"{holder.get('started', '?')}; see --overlap (forbid, "
                                     "wait, replace, allow)")
            if policy == "replace" and not signalled and holder.get("pid"):
                os.kill(int(holder["pid"]), signal.SIGUSR1)  # its submit cancels its job
                signalled = clock()
                deadline = min(deadline, signalled + REPLACE_WAIT_S)
            if clock() > deadline:
                raise JobTimeout(f"waited until --timeout for the local run of this job (pid "
                                 f"{holder.get('pid', '?')}) to finish; it still runs")
            time.sleep(0.1)
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": started}).encode(), 0)

    def _try(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def holder(self) -> dict[str, str]:
        try:
            value = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except ValueError:  # being written
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    def release(self) -> None:
        os.close(self.fd)


@contextmanager
def _machine_lock(directory: Path) -> Iterator[None]:
    """One local cluster at a time chooses its CPUs."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "cpus.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def taken_cpus(directories: list[Path]) -> dict[int, list[int]]:
    """CPU -> pids of the live local clusters that pinned workers to it."""
    taken: dict[int, list[int]] = {}
    for path in directories:
        try:
            pid = int((path / "owner.pid").read_text())
            cpus = json.loads((path / "cpus.json").read_text())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or not psutil.pid_exists(pid):
            continue
        for cpu in cpus:
            taken.setdefault(int(cpu), []).append(pid)
    return taken


def share_cpus(mine: Path, others: list[Path], wanted: tuple[int, ...], claim: bool = True
               ) -> tuple[tuple[int, ...], bool]:
    """The CPUs this local cluster pins its workers to, and whether to pin at all; recorded in
    ``mine`` for the next one (unless not ``claim``: a test's long-lived cluster)."""
    with _machine_lock(state_dir()):
        taken = taken_cpus(others)
        free = tuple(c for c in wanted if c not in taken)
        pids = sorted({p for c in wanted for p in taken.get(c, [])})
        if free and len(free) < len(wanted):
            log.warning("CPUs %s are taken by another private local cluster (pid %s): this one "
                        "uses CPUs %s", _list(sorted(set(wanted) - set(free))), _list(pids),
                        _list(free))
        elif not free:
            log.warning("every CPU is taken by other private local clusters (pid %s): this "
                        "one's %d workers run unpinned, sharing them", _list(pids), len(wanted))
        chosen, pin = (free, True) if free else (wanted, False)
        (mine / "cpus.json").write_text(json.dumps(list(chosen) if pin and claim else []))
    return chosen, pin


def _list(values: list[int] | tuple[int, ...]) -> str:
    return ",".join(map(str, values))
