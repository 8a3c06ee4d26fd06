"""What the coordinator holds of a job's results, and the run's summary.

``Results`` is the coordinator's own first-result-wins guard: whatever Redis says (it may have
lost its data and be recording units a second time), a unit's result is taken once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .plan import Tally

_EMPTY = object()  # the accumulator before the first result
# (index, value, None) for a result, (index, None, error) for a unit that failed
Deliver = Callable[[int, Any, "dict[str, Any] | None"], None]


class Results:
    """Results by index, or folded into an accumulator by the job's ``reduce``."""

    def __init__(self, reduce: Callable[[Any, Any], Any] | None,
                 deliver: Deliver | None = None) -> None:
        self.reduce = reduce
        # cluster.Executor: each result (or failure) goes to its Future as it arrives, and
        # nothing is kept here
        self.deliver = deliver
        self.values: dict[int, Any] = {}
        self.accumulator: Any = _EMPTY
        self.taken = bytearray()

    def is_taken(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self.taken) and bool(self.taken[byte] & (1 << (index & 7)))

    def mark(self, index: int) -> bool:
        """Mark ``index`` as done; False when it already was (a duplicate)."""
        if self.is_taken(index):
            return False
        byte = index >> 3
        if byte >= len(self.taken):
            self.taken.extend(bytes(byte + 1 - len(self.taken) + len(self.taken) // 2))
        self.taken[byte] |= 1 << (index & 7)
        return True

    def missing(self, recorded: bytes) -> list[int]:
        """Units set in a Redis bitmap ``recorded`` (bit 0 is the high bit of byte 0) that were
        not taken here."""
        lost = []
        for byte, bits in enumerate(recorded):
            for bit in range(8):
                if bits & (0x80 >> bit) and not self.is_taken(byte * 8 + bit):
                    lost.append(byte * 8 + bit)
        return lost

    def add(self, index: int, value: Any) -> None:
        """Keep (or fold, or deliver) the result of a unit just marked."""
        if self.deliver is not None:
            self.deliver(index, value, None)
        elif self.reduce is None:
            self.values[index] = value
        elif self.accumulator is _EMPTY:
            self.accumulator = value
        else:
            self.accumulator = self.reduce(self.accumulator, value)

    def gathered(self, count: int) -> Any:
        """What ``gather`` receives: results in scatter order (None for a failed unit), or
        the accumulator."""
        if self.deliver is not None:
            return None
        if self.reduce is not None:
            return None if self.accumulator is _EMPTY else self.accumulator
        ordered = [self.values.get(i) for i in range(count)]
        self.values.clear()
        return ordered


def redis_bitmap(indices: list[int]) -> bytes:
    """A Redis bitmap (bit 0 is the high bit of byte 0) with the bits of ``indices`` set."""
    mask = bytearray((max(indices) >> 3) + 1 if indices else 0)
    for index in indices:
        mask[index >> 3] |= 0x80 >> (index & 7)
    return bytes(mask)


@dataclass
class RunResult:
    jid: str
    value: Any
    tally: Tally
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    mismatched: list[int] = field(default_factory=list)
    reused: bool = False  # the result a previous run of the job gathered and kept in Redis

    def summary(self) -> str:
        if self.reused:
            return (f"the result of job {self.jid} was kept in Redis by an earlier run: nothing "
                    "computed again")
        t, s = self.tally, self.stats
        hosts = len(t.hosts())
        rate = t.done / self.seconds if self.seconds > 0 else 0.0
        line = (f"{t.done} units on {len(t.by_worker)} workers ({hosts} host"
                f"{'' if hosts == 1 else 's'}) in {self.seconds:.1f} s, {rate:.1f} units/s, "
                f"{s.get('reissued', 0)} reissued, "
                f"{s.get('duplicates', 0) + s.get('stale', 0)} duplicates discarded")
        if s.get("speculated"):
            line += f", {s['speculated']} speculative copies"
        if s.get("lost_data"):
            line += f", {s['lost_data']} recorded results lost with their host and computed again"
        if self.mismatched:
            line += f", {len(self.mismatched)} nondeterministic"
        if t.rejected:
            line += f", {t.rejected} results entries rejected (malformed, or naming a unit " \
                    "never scattered: see the warnings)"
        if s.get("log_dropped"):
            line += f", {s['log_dropped']} log records dropped (over --max-log-size)"
        if self.failed:
            shown = ", ".join(map(str, self.failed[:10])) + ("..." if len(self.failed) > 10
                                                              else "")
            line += f", {len(self.failed)} failed (units {shown})"
        return line
