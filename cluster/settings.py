"""The accepted range of every numeric setting, shared by the command line (``cli.py``) and
hosts.ini (``config.py``), so that a flag and its hosts.ini key accept the same values.

A value out of range is refused where it is parsed, with a message that says what is accepted:
``--heartbeat: 0 is not a number of seconds from 0.01 to 60``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError

HEARTBEAT_S = 0.5  # the agents' default heartbeat and lease renewal interval
PRINT_MODES = ("auto", "json", "text", "none")  # submit --print (``output``)
LEASE_S = 5.0  # the default lease of a worker
DEFAULT_HISTORY_DAYS = 30.0  # how long a cluster's Redis keeps records of runs (history_days)


@dataclass(frozen=True)
class Range:
    """Accepted values of one numeric setting: ``low`` to ``high`` (``low`` itself excluded
    when ``above``); whole numbers only when ``whole``."""

    low: float
    high: float = math.inf
    unit: str = ""  # "seconds", "hours": part of the message
    whole: bool = False
    above: bool = False

    def parse(self, text: str) -> float:
        """The value of ``text``, or ``ValueError`` whose message says what is accepted."""
        try:
            value = int(text) if self.whole else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not {self.describe()}") from None
        if not self.accepts(value):
            raise ValueError(f"{text.strip()} is not {self.describe()}")
        return value

    def accepts(self, value: float) -> bool:
        if not self.whole and not math.isfinite(value):
            return False
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        kind += f" of {self.unit}" if self.unit else ""
        if self.above:
            return f"{kind} above {self.low:g}" + (
                f" and at most {self.high:g}" if self.high < math.inf else "")
        if self.high < math.inf:
            return f"{kind} from {self.low:g} to {self.high:g}"
        return f"{kind} of at least {self.low:g}"


# submit
TIMEOUT = Range(0, unit="seconds", above=True)
WORKER_TIMEOUT = Range(0.1, 7 * 86400, unit="seconds")
MAX_ATTEMPTS = Range(1, 1000, whole=True)
MAX_FAILED = Range(0, whole=True)
LEASE = Range(0.1, 3600, unit="seconds")
KEEP_HOURS = Range(0.001, 24 * 365, unit="hours")  # 3.6 s: the coordinator renews the
SEED = Range(0, whole=True)  # expiry three times per --keep, at most every 30 s
MAX_RESULT_MB = Range(0, 512, unit="MB", above=True)  # Redis takes no value over 512 MB
MAX_LOG_MB = Range(0, 4096, unit="MB")
MAX_WORKDIR_MB = Range(0, 512, unit="MB", above=True)  # shipped as one Redis value
# agent (and hosts.ini)
HEARTBEAT = Range(0.01, 60, unit="seconds")
REDIS_GRACE = Range(0, 7 * 86400, unit="seconds")
THREADS = Range(1, 1024, whole=True)
CORES = Range(1, 65536, whole=True)
# hosts.ini
PORT = Range(1, 65535, whole=True)
CONNECT_TIMEOUT = Range(0.1, 600, unit="seconds")
HISTORY_DAYS = Range(0, 3650, unit="days", above=True)
# jobs
RUNS_SHOWN = Range(1, 10_000, whole=True)


RENEWALS_PER_S = 1000.0  # agents on a large cluster renew less often, to keep Redis at this
RENEWAL_MOST_S = 1.0  # ... up to once a second


def renewal_interval(heartbeat_s: float, agents: int) -> float:
    """How often an agent renews when ``agents`` agents hold leases: every heartbeat, or less
    often on a cluster so large that renewals would cost Redis more than ``RENEWALS_PER_S`` a
    second (up to ``RENEWAL_MOST_S``: each renewal is one request, whatever its workers)."""
    return max(heartbeat_s, min(RENEWAL_MOST_S, agents / RENEWALS_PER_S))


def lease_problem(lease_s: float, heartbeat_s: float) -> str | None:
    """Why a lease is too short for this heartbeat, or None: a worker's lease is renewed once
    per heartbeat, so a lease of two heartbeats or less lapses on healthy workers."""
    if lease_s > 2 * heartbeat_s:
        return None
    return (f"must be more than twice the heartbeat ({heartbeat_s:g} s), or healthy workers "
            "are taken for lost between two renewals")


@dataclass(frozen=True)
class Memory:
    """A memory limit: ``size`` bytes, or ``fraction`` of the machine's RAM."""

    size: int | None = None
    fraction: float = 0.5

    def of(self, total_bytes: int) -> int:
        return self.size if self.size is not None else int(total_bytes * self.fraction)

    def __str__(self) -> str:
        return human_bytes(self.size) if self.size is not None else f"{self.fraction:.0%} of RAM"


UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
MIN_MEMORY = 32 * 2**20
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> Memory:
    """``60%`` (of RAM), ``4gb``, ``512mb`` or a number of bytes; ``ValueError`` otherwise."""
    accepted = "a share of RAM from 1% to 90% (e.g. 60%) or a size of at least 32mb (e.g. 4gb)"
    value = text.strip()
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not {accepted}") from None
        if not 1 <= percent <= 90:
            raise ValueError(f"{value} is not {accepted}")
        return Memory(fraction=percent / 100)
    match = SIZE.match(value)
    if match is None:
        raise ValueError(f"{text!r} is not {accepted}")
    suffix = match[2].lower()
    size = int(float(match[1]) * UNITS[suffix if suffix in UNITS else suffix + "b"])
    if size < MIN_MEMORY:
        raise ValueError(f"{value} is not {accepted}")
    return Memory(size=size)


def human_bytes(size: int) -> str:
    for unit, factor in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def parse_cpus(spec: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> (0, 1, 2, 3, 8)."""
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError(part)
            cpus.extend(range(first, last + 1))
    except ValueError:
        raise UsageError(f"bad CPU list {spec!r}: expected e.g. 0-3,8-11") from None
    if not cpus or len(set(cpus)) != len(cpus):
        raise UsageError(f"bad CPU list {spec!r}: empty or repeated CPUs")
    return tuple(cpus)
