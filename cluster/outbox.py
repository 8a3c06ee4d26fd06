"""How a worker's outcomes leave it: each sealed for its job, unit and worker; a commit's
small results packed and sealed together; a large result put in the host's spool, named by
its outcome. A retried commit sends what its first try sent (``seal_once``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

from .delivery import BLOB_THRESHOLD
from .entries import PACKED, Commit, Outcome, Work, pack_results
from .signing import Sealer
from .spool import DIRECT, DIRECT_THRESHOLD, Spool

# a unit encoded and sealed on its own, as queued again (``Worker.unit_blob``)
UnitBlob = Callable[[Work, int], bytes]


class Outbox:
    def __init__(self, sealer: Sealer, wid: str, spool: Spool | None = None) -> None:
        self.sealer = sealer
        self.wid = wid
        self.spool = spool  # the host's spool of large results (``dataserver``), if any
        # the outcomes of the commit under way, and how they were sealed (``seal_once``)
        self.sealed_for: tuple[tuple[str, list[Outcome]], tuple[list[Outcome], bytes]] | None \
            = None

    def forget(self) -> None:
        """The commit under way went through: the next outcomes are sealed afresh."""
        self.sealed_for = None

    def seal_once(self, work: Work, outcomes: list[Outcome],
                  unit_blob: UnitBlob) -> tuple[list[Outcome], bytes]:
        """The outcomes sealed, and the commit's small results packed and sealed together
        (``entries.pack_results``); a retried commit of the same outcomes sends what the
        first try sent (a result spooled once is not written again: the coordinator may have
        taken it). Outcomes replaced (failed for a full Redis) drop what their first sealing
        spooled."""
        if self.sealed_for is not None:
            (msgid, first), done = self.sealed_for
            if msgid == work.msgid and first is outcomes:
                return done
            self.drop_spooled(Commit("STALE"), done[0])
        small = [o.kind == "ok" and len(o.payload) < BLOB_THRESHOLD for o in outcomes]
        packed = b""
        if sum(small) > 1:
            packed = self.sealer.seal(pack_results([
                (o.index, o.digest, o.payload) for o, p in zip(outcomes, small, strict=True) if p]),
                "results", work.jid, self.wid)
        sealed = [dataclasses.replace(o, payload=PACKED, digest=b"") if packed and p
                  else self.sealed(work, o, unit_blob)
                  for o, p in zip(outcomes, small, strict=True)]
        self.sealed_for = ((work.msgid, outcomes), (sealed, packed))
        return sealed, packed

    def sealed(self, work: Work, outcome: Outcome, unit_blob: UnitBlob) -> Outcome:
        """The outcome with its result and digest, or its error, signed for its job and unit
        (a result and a digest also for this worker). A large result goes to the host's spool
        when it fits, and the outcome names it (with its unit: queued again if the result is
        lost with the host)."""
        jid, index = work.jid, outcome.index
        if outcome.kind == "ok":
            digest = self.sealer.seal(outcome.digest, "digest", jid, index, self.wid)
            context = ("result", jid, index, self.wid)
            if self.spool is not None and work.spool and len(outcome.payload) >= DIRECT_THRESHOLD:
                tag = self.sealer.tag(outcome.payload, context)
                # named by entry and worker: a copy elsewhere never overwrites this one
                token = hashlib.blake2b(f"{work.msgid} {self.wid}".encode(),
                                        digest_size=8).hexdigest()
                ref = self.spool.put(jid, index, token, [outcome.payload, tag])
                if ref is not None:
                    return dataclasses.replace(outcome, payload=ref, digest=digest,
                                               unit=unit_blob(work, index))
            return dataclasses.replace(
                outcome, payload=self.sealer.seal(outcome.payload, *context), digest=digest)
        return dataclasses.replace(outcome,
                                   payload=self.sealer.seal(outcome.payload, "failure", jid, index))

    def drop_spooled(self, answer: Commit, sealed: list[Outcome]) -> None:
        """Delete this commit's spooled results that were not recorded: all of them when the
        commit was stale or its job gone, else the duplicates RECORD names."""
        if self.spool is None:
            return
        refs = [o.payload for o in sealed if o.kind == "ok" and o.payload[:1] == DIRECT]
        gone = refs if answer.status in ("STALE", "GONE") else answer.dropped
        for ref in gone:
            with contextlib.suppress(OSError, ValueError):
                self.spool.remove(ref)
