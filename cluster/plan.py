"""The coordinator's decisions, as pure functions of what it has seen: no I/O, no clock.

- ``Batcher``: how many units go into one stream entry, so that small units share the
  per-message cost and large or slow units still spread over every worker.
- ``Tally``: what has been scattered, recorded and failed, how many units may be queued ahead
  of the workers (so that scatter is consumed as workers keep up and never materialised).
- ``speculation_threshold_ms``: when a straggling entry deserves a speculative copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Batcher:
    """Batch size from the measured compute time and result size per unit (EWMA): a batch holds
    about ``target_s`` of compute and at most ``max_bytes`` of units or of results.

    The more workers, the longer a batch: every batch costs Redis and the coordinator a fixed
    few hundred microseconds, so ``workers`` computing batches of ``workers / batches_per_s``
    seconds each keep the control plane at ``batches_per_s`` whatever the cluster's size (up
    to batches of ``most_s``: beyond, a job's last batches would straggle too long)."""

    target_s: float = 0.05
    batches_per_s: float = 1000.0
    most_s: float = 30.0
    max_units: int = 1024
    max_bytes: int = 1 << 20
    unit_s: float | None = None
    result_bytes: float = 0.0

    def observe(self, units: int, seconds: float, result_bytes: int = 0) -> None:
        if units <= 0:
            return
        per_unit = max(seconds / units, 1e-7)
        size = result_bytes / units
        if self.unit_s is None:
            self.unit_s, self.result_bytes = per_unit, size
        else:
            self.unit_s = 0.7 * self.unit_s + 0.3 * per_unit
            self.result_bytes = 0.7 * self.result_bytes + 0.3 * size

    def size(self, workers: int = 0) -> int:
        """Units in a batch when ``workers`` compute them."""
        if self.unit_s is None:
            return 1
        target = max(self.target_s, min(self.most_s, workers / self.batches_per_s))
        by_time = int(target / self.unit_s)
        by_bytes = int(self.max_bytes / max(self.result_bytes, 1.0))
        return max(1, min(self.max_units, by_time, by_bytes))


INFLIGHT_BYTES = 24 << 20  # results queued ahead may hold this much of Redis's memory


@dataclass
class Tally:
    """Counts of one run, and the window of units allowed in flight."""

    per_worker_batches: int = 3
    scattered: int = 0
    recorded: int = 0
    failed: int = 0
    rejected: int = 0  # results entries refused: malformed, or naming a unit never scattered
    lost_data: int = 0  # spooled results lost with their host, computed again
    exhausted: bool = False
    by_worker: Counter[str] = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return self.recorded + self.failed

    @property
    def outstanding(self) -> int:
        return self.scattered - self.done

    @property
    def finished(self) -> bool:
        return self.exhausted and self.done == self.scattered

    def room(self, workers: int, batch: int, batch_bytes: float = 0.0) -> int:
        """How many more units may be queued now: ``per_worker_batches`` per worker, fewer when
        their results (``batch_bytes`` per batch) would hold more than ``INFLIGHT_BYTES`` in
        Redis between their recording and the coordinator gathering them; never less than a
        batch per worker and one more."""
        workers = max(1, workers)
        window = workers * self.per_worker_batches * batch
        if batch_bytes > 0:
            fits = int(INFLIGHT_BYTES / batch_bytes) * batch
            window = min(window, max(fits, (workers + 1) * batch))
        return max(0, window - self.outstanding)

    def whole_batches(self, workers: int, batch: int, batch_bytes: float = 0.0) -> int:
        """How many batches of ``batch`` units may be queued now: whole ones only (``room``
        always has room for one once the workers catch up)."""
        return self.room(workers, batch, batch_bytes) // max(1, batch)

    def hosts(self) -> set[str]:
        return {host_of(w) for w in self.by_worker}

    def by_host(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for wid, n in self.by_worker.items():
            counts[host_of(wid)] += n
        return counts


def host_of(wid: str) -> str:
    """Worker ids are ``host/agent pid/cpuN.generation``."""
    return wid.split("/", 1)[0]


def speculation_threshold_ms(tally: Tally, batcher: Batcher, workers: int) -> float | None:
    """How long an entry may run before it gets a speculative copy; None while there is no
    room for copies (scatter not done, or fewer than half the workers idle)."""
    if not (tally.exhausted and 0 < tally.outstanding and tally.outstanding * 2 <= workers):
        return None
    expected_ms = 1000 * (batcher.unit_s or 0.0) * batcher.size(workers)
    return max(2000.0, 4 * expected_ms)
