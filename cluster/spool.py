"""A host's spool of large results (``dataserver``): written by its workers, served and deleted
by its agent's data server, swept by the agent when their job is gone.

A result of at least ``DIRECT_THRESHOLD`` bytes is written here, sealed, as one file named
``JOB.UNIT.TOKEN``; Redis records ``D`` + ``address:port/name``. The spool is bounded
(``limit`` bytes): a result that does not fit goes through Redis as before (``broker``), which
is bounded in turn, so a coordinator that gathers slowly holds its workers back instead of
filling the host's memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

DIRECT_THRESHOLD = 512 * 1024
DIRECT = b"D"


@dataclass(frozen=True)
class Spool:
    dir: Path
    where: str  # address:port of the host's data server
    limit: int  # bytes the spool may hold

    def to_json(self) -> dict[str, object]:
        return {"dir": str(self.dir), "where": self.where, "limit": self.limit}

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> Spool | None:
        if not data:
            return None
        return cls(Path(str(data["dir"])), str(data["where"]), int(str(data["limit"])))

    def used(self) -> int:
        """Bytes in the spool now. Counted on each put: every worker of the host writes here
        and the data server deletes, so no process could keep a running total; the files are
        few (each leaves as it is fetched)."""
        total = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
        return total

    def put(self, jid: str, index: int, token: str, parts: Iterable[bytes | memoryview]
            ) -> bytes | None:
        """Write a sealed result (its parts, in order) as ``JOB.UNIT.TOKEN`` (the same token
        rewrites the same file); its reference, or None when the spool is full (or cannot be
        written): the caller sends the result through Redis."""
        parts = list(parts)
        size = sum(len(p) for p in parts)
        try:
            if self.used() + size > self.limit:
                return None
            name = f"{jid}.{index}.{token}"
            fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                written = os.writev(fd, parts)
                while written < size:  # a short write: the rest, from where it stopped
                    rest = b"".join(bytes(p) for p in parts)[written:]
                    written += os.write(fd, rest)
            finally:
                os.close(fd)
        except OSError:
            return None
        return DIRECT + f"{self.where}/{name}".encode()

    def remove(self, ref: bytes) -> None:
        """Delete a result of ours that was not recorded (a duplicate, a stale commit)."""
        _, name = parse(ref)
        (self.dir / name).unlink(missing_ok=True)

    def sweep(self, exists: Callable[[list[str]], list[bool]]) -> int:
        """Delete the results of jobs that are gone (finished, cancelled, expired) and that
        no coordinator will take; ``exists`` says which job ids are still in Redis."""
        files = [p for p in self.dir.iterdir() if p.name.count(".") == 2]
        jobs = sorted({p.name.split(".", 1)[0] for p in files})
        if not jobs:
            return 0
        gone = {jid for jid, there in zip(jobs, exists(jobs), strict=True) if not there}
        removed = 0
        for path in files:
            if path.name.split(".", 1)[0] in gone:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def parse(ref: bytes) -> tuple[str, str]:
    """``(address:port, name)`` of a ``D`` reference; ``ValueError`` when malformed."""
    text = ref[1:].decode("ascii")
    where, _, name = text.rpartition("/")
    if not where or ":" not in where or not name or name.count(".") != 2:
        raise ValueError(f"bad result reference {text[:80]!r}")
    return where, name


def machine_id() -> str:
    """This machine's id (systemd's, else this boot's): equal ids, one filesystem."""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text:
                return text
    return ""


def memory_dir() -> Path:
    """Where files live in memory (/dev/shm) if there is such a place, else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def default_dir(host: str, pid: int | None = None) -> Path:
    """In memory where possible: a result is written and read at memory speed; one directory
    per agent, removed when it stops."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in host)
    return memory_dir() / f"cluster-spool-{safe}-{os.getpid() if pid is None else pid}"


def remove_dead_spools(host: str) -> None:
    """Remove the default spools of this host's agents that died without cleaning up (killed,
    or their host was): nobody serves them any more."""
    pattern = default_dir(host, 0).name[:-1] + "*"
    for path in memory_dir().glob(pattern):
        pid = path.name.rpartition("-")[2]
        with contextlib.suppress(OSError):
            if pid.isdigit() and path.name == default_dir(host, int(pid)).name and \
                    not psutil.pid_exists(int(pid)) and \
                    os.getuid() in (0, path.stat().st_uid):
                shutil.rmtree(path, ignore_errors=True)


def default_limit(path: Path) -> int:
    """A quarter of the host's memory, and at most half the free space where the spool is."""
    free = shutil.disk_usage(path).free
    return int(min(psutil.virtual_memory().total // 4, free // 2))
