"""The coordinator's reading side: results entries in recording order, each unit taken once,
and dropped from Redis once taken.

Every method that does I/O changes local state only after that I/O succeeded, so the
coordinator can repeat it after a Redis error or a lost reply (``Coordinator.guarded``): the
cursor moves past an entry only once the entry is taken, and dropping what was taken is
idempotent.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from typing import Any

from . import codec, dataserver
from .broker import Broker
from .entries import (
    PACKED,
    Failed,
    Recorded,
    Snapshot,
    Unrecorded,
    output_block,
    parse_result,
    unpack_results,
)
from .errors import CodecError, InfraError, JobFailed, JobGone, UnitFailed
from .plan import Batcher, Tally
from .results import Results, redis_bitmap
from .signing import Forged, Sealer
from .spool import DIRECT
from .spool import parse as parse_ref

log = logging.getLogger("cluster.coordinator")
Payload = bytes | bytearray | mmap.mmap  # a result as read: from Redis, a host, or mapped
MAX_ERRORS_KEPT = 20  # failed units whose error and traceback the run's record holds


class Rejected(Exception):
    """A results entry that is malformed, not signed by the cluster's key, or names a unit
    never scattered: counted, logged with its entry id, and otherwise ignored. ``unit``: the
    unit a forged entry claims."""

    def __init__(self, why: str, unit: int | None = None) -> None:
        super().__init__(why)
        self.unit = unit


def _failure_index(fields: dict[bytes, bytes]) -> int | None:
    try:
        return int(fields[b"f"])
    except (KeyError, ValueError):
        return None


class Gatherer:
    def __init__(self, broker: Broker, results: Results, tally: Tally, batcher: Batcher,
                 max_failed: int, reduce_failed: Callable[[Exception], JobFailed],
                 clock: Callable[[], float], sealer: Sealer,
                 units: Callable[[], int] = lambda: 1 << 62,
                 data: dataserver.Client | None = None) -> None:
        self.broker = broker
        self.sealer = sealer
        self.data = data  # fetches results from the hosts' spools (``dataserver``)
        self.lost_from: dict[str, int] = {}  # results lost, by where they were held
        self.units = units  # how many units were scattered: a result for any other is refused
        self.results = results
        self.tally = tally
        self.batcher = batcher
        self.max_failed = max_failed
        self.reduce_failed = reduce_failed
        self.clock = clock
        self.jid = self.owner = ""
        self.last_id = "0-0"
        self.drop_upto = ""  # taken results entries not yet dropped from Redis
        self.drop_refs: list[bytes] = []
        self.failed: list[int] = []
        self.errors: dict[int, dict[str, Any]] = {}  # of the first failed units, for the record
        self.mismatched: list[int] = []
        self.digests = bytearray()  # 8 bytes per unit: the first result's digest seen
        self.last_progress = clock()

    def restart(self, jid: str, owner: str) -> None:
        """Read the job's results from the start (a new job, or one Redis lost)."""
        self.jid, self.owner = jid, owner
        self.last_id, self.drop_upto, self.drop_refs = "0-0", "", []

    def catch_up(self, snapshot: Snapshot) -> set[int]:
        """Resumed: take the results recorded up to the takeover. Those the snapshot says were
        recorded but that are no longer in Redis were gathered by the previous coordinator and
        died with it: their recorded bits are cleared, so that they are recorded again. Returns
        those units, to be queued again."""
        while _after(snapshot.last_result, self.last_id) and self.collect(block_ms=None):
            pass
        lost = self.results.missing(snapshot.recorded)
        if lost:
            self.broker.reclaim(self.jid, self.owner, redis_bitmap(lost))
            log.warning("job=%s: %d results were gathered by the previous coordinator and lost "
                        "with it; computing them again", self.jid, len(lost))
        return set(lost)

    def collect(self, block_ms: int | None) -> int:
        """Take the results recorded since the last call; drop them from Redis once taken.
        Returns how many entries were read."""
        entries = self.broker.read_results(self.jid, self.last_id, 512, block_ms)
        for mid, fields in entries:
            try:
                self.drop_refs += self.take(mid, fields)
            except Rejected as exc:
                self.rejected(mid, str(exc), exc.unit)
            self.last_id = self.drop_upto = mid
            if self.drop_refs:  # large results: out of Redis at once, not after the batch
                self.drop()
        if self.drop_upto:
            self.drop()
        return len(entries)

    def drop(self) -> None:
        self.broker.consume(self.jid, self.owner, self.drop_upto, self.drop_refs)
        self.drop_upto, self.drop_refs = "", []

    def rejected(self, mid: str, why: str, unit: int | list[int] | None = None) -> None:
        """Count and log an entry (or one result in it) that is not the cluster's. When it
        names a unit not taken yet, that unit's recorded bit (which its writer may have set,
        making the real result a duplicate) is cleared, so the real result is recorded."""
        self.tally.rejected += 1
        log.warning("job=%s: results entry %s rejected: %s", self.jid, mid, why)
        units = [] if unit is None else [unit] if isinstance(unit, int) else unit
        open_units = [u for u in units if not self.results.is_taken(u)]
        if open_units:
            self.broker.reclaim(self.jid, self.owner, redis_bitmap(open_units))

    def take(self, mid: str, fields: dict[bytes, bytes]) -> list[bytes]:
        """Take one results entry (first result wins here too); returns the references of
        its large results, to drop from Redis."""
        entry = self.checked(fields)
        if isinstance(entry, Failed):
            self.unit_failed(entry.index, entry.error)
            return []
        if isinstance(entry, Unrecorded):
            for index, seen in entry.digests:
                self.compare(index, seen, entry.wid)
            if entry.forged:
                self.rejected(mid, f"{entry.forged} digests not signed by this cluster's key")
            return []
        units = self.opened(mid, entry)
        for index, payload in units:
            try:
                value = codec.decode(payload, owned=not isinstance(payload, bytes))
            except CodecError as exc:  # a corrupt (or forged) recorded result: fails its unit
                self.unit_failed(index, {"error": f"its recorded result does not decode: {exc}",
                                         "worker": entry.wid})
                continue
            self.compare(index, codec.digest(payload), entry.wid)
            self.results.mark(index)
            try:
                self.results.add(index, value)
            except Exception as exc:  # noqa: BLE001 - reduce() is the job's code
                raise self.reduce_failed(exc) from None
        self.tally.recorded += len(units)
        self.tally.by_worker[entry.wid] += len(units)
        # what results hold of Redis's memory until gathered: nothing for spooled ones
        spooled = {i for i, p in entry.units if p[:1] == DIRECT}
        self.batcher.observe(entry.batch, entry.seconds,
                             sum(len(p) for i, p in units if i not in spooled))
        if units:
            self.last_progress = self.clock()
        # what to drop from Redis: large results in it, and units kept for spooled ones
        return [p[1:] for _, p in entry.units if p[:1] == b"R"] + [
            b"U%d" % i for i, p in entry.units if p[:1] == DIRECT]

    def opened(self, mid: str, entry: Recorded) -> list[tuple[int, bytes | memoryview]]:
        """The entry's results for units not taken yet, large ones fetched, each checked to be
        signed for this job, unit and worker (one that is not is rejected)."""
        wanted_units = [(i, p) for i, p in entry.units if not self.results.is_taken(i)]
        packed = self.unpacked(mid, entry, [i for i, p in wanted_units if p == PACKED])
        units = self.fetched(mid, [(i, p) for i, p in wanted_units if p != PACKED])
        wanted = [bytes(p) for _, p in units if p[:1] == b"R"]  # references: a few bytes
        if wanted:
            blobs = self.broker.fetch_blobs(self.jid, wanted)
            self.check_blobs(units, blobs)
            found = iter(blobs)
            units = [(i, (next(found) or b"") if p[:1] == b"R" else p) for i, p in units]
        opened: list[tuple[int, bytes | memoryview]] = list(packed)
        for index, sealed in units:
            try:
                opened.append((index, self.sealer.open(sealed, "result", self.jid, index,
                                                       entry.wid)))
            except Forged:
                self.rejected(mid, f"the result of unit {index} is not signed by this "
                              f"cluster's key (it claims worker {entry.wid})", index)
        return opened

    def unpacked(self, mid: str, entry: Recorded, indices: list[int]
                 ) -> list[tuple[int, bytes]]:
        """The results the entry names as packed (``P``), from its packed results, checked to
        be signed for this job and worker (when they are not, each unit is rejected)."""
        if not indices:
            return []
        try:
            found = unpack_results(self.sealer.open(entry.packed, "results", self.jid,
                                                    entry.wid))
        except (Forged, ValueError) as exc:
            why = ("not signed by this cluster's key" if isinstance(exc, Forged)
                   else f"malformed ({exc})")
            self.rejected(mid, f"the packed results of units {indices[0]} to {indices[-1]} "
                          f"are {why} (they claim worker {entry.wid})", indices)
            return []
        missing = [i for i in indices if i not in found]
        if missing:
            self.rejected(mid, f"unit {missing[0]} is not in its packed results", missing)
        return [(i, found[i][1]) for i in indices if i in found]

    def fetched(self, mid: str, units: list[tuple[int, bytes]]) -> list[tuple[int, Payload]]:
        """The units with their spooled results fetched from the hosts (``dataserver``). A
        result its host no longer serves (it died, was cut off, or restarted its agent) is
        computed again: its unit is queued again (``Broker.requeue``) and left out here."""
        out: list[tuple[int, Payload]] = []
        for index, payload in units:
            if payload[:1] != DIRECT:
                out.append((index, payload))
                continue
            try:
                where, name = parse_ref(payload)
            except ValueError as exc:
                self.rejected(mid, str(exc))
                continue
            data: bytearray | mmap.mmap | None = None
            why = "its host no longer has it"
            try:
                if self.data is None:
                    raise dataserver.Unreachable("this coordinator has no data client")
                data = self.data.take(where, name)
            except dataserver.Unreachable as exc:
                why = str(exc)
            if data is not None:
                out.append((index, data))
            elif self.broker.requeue(self.jid, self.owner, index, payload):
                self.tally.lost_data += 1
                self.report_lost(index, where, why)
        return out

    def report_lost(self, index: int, where: str, why: str) -> None:
        """A warning for the first result lost with each host, then for every hundredth: a
        dead host may have held many."""
        seen = self.lost_from.get(where, 0)
        self.lost_from[where] = seen + 1
        if seen % 100 == 0:
            log.warning("unit=%d job=%s: its recorded result is lost (%s): computing it again, "
                        "through Redis%s", index, self.jid, why,
                        f" ({seen + 1} from {where} so far)" if seen else "")

    def checked(self, fields: dict[bytes, bytes]) -> Recorded | Failed | Unrecorded:
        """The entry, if it is well formed and names only units that were scattered; else
        ``Rejected``."""
        try:
            entry = parse_result(fields, self.sealer, self.jid)
        except Forged as exc:
            raise Rejected(str(exc), _failure_index(fields)) from None
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
            raise Rejected(f"malformed ({type(exc).__name__}: {str(exc)[:100]})") from None
        if isinstance(entry, Failed):
            if not isinstance(entry.error, dict):
                raise Rejected("a failure whose error is not a JSON object")
            indices = [entry.index]
        else:
            indices = [i for i, _ in (entry.digests if isinstance(entry, Unrecorded)
                                      else entry.units)]
        limit = self.units()
        outside = [i for i in indices if not 0 <= i < limit]
        if outside:
            raise Rejected(f"it names unit {outside[0]}, but units 0 to {limit - 1} were "
                           "scattered")
        return entry

    def compare(self, index: int, seen: bytes, wid: str) -> None:
        """Two results for one unit, in whichever order they come: are they the same?"""
        at = index * 8
        if len(self.digests) < at + 8:
            self.digests.extend(bytes(at + 8 - len(self.digests) + len(self.digests) // 2))
        first = bytes(self.digests[at:at + 8])
        if first == bytes(8):
            self.digests[at:at + 8] = seen
        elif first != seen and index not in self.mismatched:
            self.mismatched.append(index)
            log.warning("unit=%d job=%s: a result from %s differs from another result of the same "
                        "unit: compute() is not deterministic", index, self.jid, wid)

    def check_blobs(self, units: list[tuple[int, Payload]], blobs: list[bytes | None]) -> None:
        """A large result named by a results entry is missing: Redis lost the job (flushed),
        or something else deleted it."""
        if all(b is not None for b in blobs):
            return
        if not self.broker.job_exists(self.jid):
            raise JobGone(self.jid)
        refs = [i for i, p in units if p[:1] == b"R"]
        missing = [i for i, b in zip(refs, blobs, strict=True) if b is None]
        raise InfraError(f"job {self.jid}: the recorded result of unit {missing[0]} is missing "
                         "from Redis (was it evicted? Redis needs maxmemory-policy noeviction)")

    def unit_failed(self, index: int, error: dict[str, Any]) -> None:
        if not self.results.mark(index):
            return
        self.tally.failed += 1
        self.failed.append(index)
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors[index] = {k: v for k, v in error.items() if k != "output"}
        self.last_progress = self.clock()
        log.warning("unit=%d job=%s failed: %s", index, self.jid, error.get("error"))
        if self.results.deliver is not None:
            self.results.deliver(index, None, error)
        if self.tally.failed > self.max_failed:
            raise UnitFailed(index, error.get("error", "?"), attempts=error.get("attempts", 0),
                             worker=error.get("worker", "?"),
                             detail=error.get("traceback", "") + output_block(error.get("output")))


def _after(a: str, b: str) -> bool:
    """Stream id ``a`` comes after ``b``."""
    def key(mid: str) -> tuple[int, int]:
        ms, _, seq = mid.partition("-")
        return int(ms), int(seq or 0)

    return key(a) > key(b)
