"""The coordinator's sending side: the job's units from ``scatter``, in whole batches, into Redis
(``fill``), and what Redis took of them after an outage (``reconcile``).

``sent`` counts the units Redis confirmed queued (the job's ``scattered`` counter). Batches are
built without I/O (``next_unit``, the ``Packer``) and queued in one call; after an outage the
batches being sent are matched against Redis's counter, so none is queued twice. When Redis
counts fewer than were confirmed (it came back from an older state), scatter runs again from
the start and every unit from the first one missing, not gathered yet, is queued again;
``skip`` is how far the queue is known good, ``reclaimed`` the units below it to queue anyway
(their results died with a previous coordinator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

from . import codec
from .broker import Broker
from .entries import Batch
from .errors import CodecError, JobFailed
from .jobfile import Job
from .packing import Packer, Units
from .plan import Batcher, Tally
from .results import Results
from .signing import Sealer

log = logging.getLogger("cluster.coordinator")
NO_UNIT = object()  # scatter has no unit now (``next_unit``)
GATHERED = object()  # a unit that needs no queueing
# what a scatter yields when it has no unit now but may have more later (cluster.Executor)
WAIT = object()
MAX_UNSENT = 64  # batches built in one fill


class Scattering:
    def __init__(self, job: Job, params: dict[str, Any], tally: Tally, batcher: Batcher,
                 results: Results, sealer: Sealer, max_bytes: int,
                 user_error: Callable[[str, Exception], JobFailed]) -> None:
        self.job = job
        self.params = params
        self.tally = tally
        self.batcher = batcher
        self.results = results
        self.sealer = sealer
        self.max_bytes = max_bytes  # an encoded unit larger than this fails the job
        self.user_error = user_error
        self.jid = ""
        self.units: Iterator[Any] = iter(())
        self.waiting = False  # scatter has no unit now, but may have more (``WAIT``)
        self.unsent: list[Batch] = []
        self.backlog: Units = []  # scattered, not in a batch yet (``Packer``)
        self.packer = Packer(sealer, batcher.max_bytes, self.encoded)
        self.sent = 0  # units confirmed queued in Redis (its `scattered` counter)
        self.skip = 0  # units queued already (by a previous coordinator, or before a loss)
        self.reclaimed: set[int] = set()  # their results died with the previous coordinator
        self.total: int | None = None
        self.total_saved = False

    @property
    def known(self) -> int:
        """Units known to exist: scattered here, or queued (by us or before us)."""
        return max(self.tally.scattered, self.sent, self.skip)

    def opened(self, queued: int, total: int | None) -> None:
        """The job (re)opened with ``queued`` units in Redis already, and its total if known."""
        self.skip = self.sent = queued
        self.total = total or self.total

    @property
    def pending(self) -> bool:
        """Units scattered and not queued yet."""
        return bool(self.unsent or self.backlog)

    def start(self, skip: int | None = None) -> None:
        """Scatter from the start; with ``skip``, the first ``skip`` units are queued already."""
        if skip is not None:
            self.skip = self.sent = skip
            self.unsent, self.backlog = [], []
            self.tally.exhausted = self.total_saved = False
        self.units = self.scatter()

    def scatter(self) -> Iterator[Any]:
        """The job's units from the start (``next_unit`` skips those queued already)."""
        try:
            units = self.job.scatter(self.params)
            if hasattr(units, "__len__"):
                self.total = len(cast(Sized, units))
            elif self.job.count is not None and self.total is None:
                self.total = int(self.job.count(self.params))
            iterator = iter(units)
        except Exception as exc:  # noqa: BLE001 - the job's own failure
            raise self.user_error("scatter()", exc) from None
        self.tally.scattered = 0
        return iterator

    def reconcile(self, queued: int) -> None:
        """After an outage, with Redis's count of queued units: which of the batches being sent
        did it take? Fewer than confirmed: it lost some, queue them again."""
        if queued < self.sent:
            log.error("job=%s: Redis lost %d of the units it had queued (restarted from an "
                      "older state?): queueing them again", self.jid, self.sent - queued)
            self.start(skip=queued)
            return
        while self.unsent and queued - self.sent >= len(self.unsent[0]):
            self.sent += len(self.unsent.pop(0))

    def fill(self, broker: Broker, jid: str, owner: str, workers: int) -> None:
        """Queue whole batches while the window has room for one: a batch finishing frees
        room for a whole batch to follow it, not for a sliver of one (batches would shrink
        to the room each result frees, and per-batch costs be paid that much more often)."""
        self.jid = jid
        batch = self.batcher.size(workers)
        batches = self.tally.whole_batches(workers, batch, batch * self.batcher.result_bytes)
        building = not self.unsent  # batches left over from an outage go first
        self.waiting = False
        while building and batches > 0 and (self.backlog or not self.tally.exhausted) \
                and len(self.unsent) < MAX_UNSENT and not self.waiting:
            batches -= 1
            while len(self.backlog) < batch:
                index, unit = self.next_unit()
                if unit is NO_UNIT:
                    break
                if unit is not GATHERED:
                    self.backlog.append((index, unit))
            if self.backlog:
                current, self.backlog = self.packer.batch(jid, self.backlog)
                self.unsent.append(current)
        if self.unsent:
            broker.add_units(jid, owner, self.unsent)
            self.sent += sum(len(b) for b in self.unsent)
            self.unsent = []
        if self.tally.exhausted and not self.total_saved:
            broker.set_total(jid, self.tally.scattered)
            self.total_saved = True

    def next_unit(self) -> tuple[int, Any]:
        """The next unit from scatter; ``GATHERED`` for one that needs no queueing (it is
        gathered already, or queued already); ``NO_UNIT`` when scatter has none now. No I/O:
        building a batch must not be cut in half by a Redis error."""
        index = self.tally.scattered
        try:
            unit = next(self.units)
        except StopIteration:
            self.tally.exhausted = True
            self.total = index
            return index, NO_UNIT
        except Exception as exc:  # noqa: BLE001
            raise self.user_error("scatter()", exc) from None
        if unit is WAIT:
            self.waiting = True
            return index, NO_UNIT
        self.tally.scattered += 1
        if self.results.is_taken(index) or (index < self.skip and index not in self.reclaimed):
            return index, GATHERED
        return index, unit

    def encoded(self, index: int, unit: Any) -> bytes:
        """One unit encoded and sealed on its own (``Packer``)."""
        try:
            blob = codec.encode(unit)
        except CodecError as exc:
            raise JobFailed(f"unit {index} from scatter() {exc}") from None
        if len(blob) > self.max_bytes:
            raise JobFailed(f"unit {index} from scatter() is {len(blob) / 1e6:.1f} MB encoded, "
                            f"more than the limit of {self.max_bytes / 1e6:g} MB "
                            "(--max-result-size)")
        return self.sealer.seal(blob, "unit", self.jid, index)
