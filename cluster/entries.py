"""What travels through Redis, as the rest of ``cluster`` sees it: a worker's delivery
(``Work``) and what it reports (``Outcome``), the answers of the protocol's scripts (``Commit``,
``Snapshot``), and the entries of a job's results stream (``Recorded``, ``Failed``,
``Unrecorded``; ``parse_result``). The key layout is in ``keys.py``, the scripts in
``scripts.py``, the client code in ``broker.py``.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from .signing import Forged, Sealer


@dataclass(frozen=True)
class Work:
    """One stream entry as a worker receives it."""

    msgid: str
    jid: str
    attempt: int
    units: list[tuple[int, bytes]]
    reason: str = ""  # why its last worker died, when it is queued past its last attempt
    spool: bool = True  # False: its result was lost with a host once, it goes through Redis
    started: bool = False  # marked as started as it was taken (``TAKE``)
    split: bool = False  # to be split into one entry per unit before anything is computed
    packed: bytes = b""  # the units in one sealed blob (``Batch``); then units hold b""


@dataclass(frozen=True)
class Batch:
    """Units queued as one work entry: index -> sealed unit, or with ``packed``, all of them
    encoded together and sealed once (``Packer``) and the units index -> b"" (the entry
    names its units, for the scripts that reissue, copy and record them)."""

    units: list[tuple[int, bytes]]
    packed: bytes = b""

    def __len__(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class Commit:
    """RECORD's answer: ``RECORDED`` (``done`` first results, ``dups`` duplicates), ``AGAIN``
    (this worker's retry of a commit that went through), ``STALE`` (the entry was reissued
    while this worker held it), ``GONE`` (the job is not in Redis) or ``NOBLOB`` (a large result
    did not reach Redis: commit again)."""

    status: str
    done: int = 0
    dups: int = 0
    dropped: tuple[bytes, ...] = ()  # results of the commit in the host's spool, not recorded


@dataclass(frozen=True)
class Renewal:
    """RENEW's answer to an agent: ``shutdown`` requested (``cluster down``); ``refused``,
    workers whose lease had lapsed and whose units went to others; ``registered``, whether the
    agent's own registration is there; ``abandoned``, workers computing a unit of a job that is
    gone; ``ended``, the count of jobs ended that this answer saw (the next renewal passes it
    on: the workers are looked at again only when it changed); ``agents``, how many agents
    hold leases (``settings.renewal_interval``)."""

    shutdown: bool
    refused: list[str]
    registered: bool
    abandoned: list[str]
    ended: str = ""
    agents: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What a coordinator taking a job over sees at that instant: the recorded bitmap, and the
    id of the last results entry then (``0-0`` when none was left)."""

    recorded: bytes
    last_result: str


@dataclass(frozen=True)
class Recorded:
    """A results entry: units of one batch recorded for the first time (payloads may be
    ``R...`` references to the job's blobs, see ``fetch_blobs``, or ``P``: in ``packed``)."""

    wid: str
    seconds: float  # compute time of the whole batch
    batch: int  # units in the batch, duplicates included
    units: list[tuple[int, bytes]]
    packed: bytes = b""  # the commit's small results together, sealed once (``pack_results``)


@dataclass(frozen=True)
class Failed:
    """A results entry: a unit recorded as failed for good."""

    index: int
    error: dict[str, Any]


@dataclass(frozen=True)
class Unrecorded:
    """A results entry: digests of results of worker ``wid`` that were not recorded (a
    duplicate, or a stale commit), to compare with the recorded ones."""

    wid: str
    digests: list[tuple[int, bytes]]
    forged: int = 0  # digests whose tag did not verify (left out of ``digests``)


PACKED = b"P"  # a result's payload in a commit: it is in the commit's packed results
_FRAME = struct.Struct("<I8sI")  # index, digest, length of the encoded result


def pack_results(results: list[tuple[int, bytes, bytes]]) -> bytes:
    """Small results of one commit as one message (index, digest, encoded result each), to
    seal once as ``("results", job id, worker)``: one tag for the batch, not one per result
    and one per digest."""
    return b"".join(_FRAME.pack(index, digest, len(payload)) + payload
                    for index, digest, payload in results)


def unpack_results(blob: bytes | memoryview) -> dict[int, tuple[bytes, bytes]]:
    """``pack_results`` undone: index -> (digest, encoded result). ``ValueError`` when it is
    malformed."""
    view, out, at = memoryview(blob), {}, 0
    while at < len(view):
        if at + _FRAME.size > len(view):
            raise ValueError("packed results cut short")
        index, digest, size = _FRAME.unpack_from(view, at)
        at += _FRAME.size
        if at + size > len(view):
            raise ValueError("packed results cut short")
        out[index] = (digest, bytes(view[at:at + size]))
        at += size
    return out


def parse_result(fields: dict[bytes, bytes], sealer: Sealer, jid: str
                 ) -> Recorded | Failed | Unrecorded:
    """One entry of a job's results stream, as RECORD writes it. A failure's error and the
    digests are opened here (``Forged``: the whole failure, or the digests that do not verify,
    are not the cluster's); results are opened by the gatherer, once large ones are fetched."""
    items = list(fields.items())
    first = items[0][0]
    if first == b"f":
        index = int(fields[b"f"])
        return Failed(index, json.loads(sealer.open(fields[b"e"], "failure", jid, index)))
    if first == b"d":
        wid = items[0][1].decode()
        rest, packed = items[1:], {}
        if rest and rest[0][0] == b"p":
            with contextlib.suppress(Forged):
                packed = unpack_results(sealer.open(rest[0][1], "results", jid, wid))
            rest = rest[1:]
        digests = []
        for i, sealed in rest:
            if sealed == PACKED:
                if int(i) in packed:
                    digests.append((int(i), packed[int(i)][0]))
                continue
            with contextlib.suppress(Forged):
                digests.append((int(i), sealer.open(sealed, "digest", jid, int(i), wid)))
        return Unrecorded(wid, digests, len(rest) - len(digests))
    blob = b""
    if len(items) > 2 and items[2][0] == b"p":
        blob = items.pop(2)[1]
    units = [(int(i), p) for i, p in items[2:]]
    return Recorded(items[0][1].decode(), float(items[1][1]), len(units), units, blob)


@dataclass(frozen=True)
class Outcome:
    """What a worker reports for one unit: ``ok`` with the encoded result, ``err`` (retryable)
    or ``fatal`` with a JSON error; ``unit`` is the encoded unit, needed to queue a retry."""

    index: int
    kind: str
    payload: bytes
    unit: bytes = b""
    digest: bytes = b""  # 8 bytes of the result's hash, to compare with later duplicates
    log: bytes = b""  # a LogRecord as JSON, when job code wrote something or the unit failed


STREAMS = ("import", "stdout", "stderr", "log")


@dataclass(frozen=True)
class LogRecord:
    """What job code wrote during one attempt at one unit: ``streams`` maps ``stdout``,
    ``stderr``, ``log`` (``logging`` records) and ``import`` (output while the job's code was
    imported, before this unit) to text; ``kind`` is the unit's outcome, ``error`` and
    ``traceback`` are set when it failed."""

    unit: int
    attempt: int
    worker: str
    time: float  # the worker host's clock, seconds since the epoch
    kind: str
    streams: dict[str, str]
    error: str = ""
    traceback: str = ""

    @property
    def host(self) -> str:
        return self.worker.split("/", 1)[0]

    def to_json(self) -> bytes:
        return json.dumps({"u": self.unit, "a": self.attempt, "w": self.worker, "t": self.time,
                           "k": self.kind, "s": self.streams, "e": self.error,
                           "tb": self.traceback}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LogRecord:
        d = json.loads(raw)
        return cls(int(d["u"]), int(d["a"]), str(d["w"]), float(d["t"]), str(d["k"]),
                   {str(k): str(v) for k, v in d.get("s", {}).items()}, str(d.get("e", "")),
                   str(d.get("tb", "")))

    def lines(self) -> list[str]:
        """Human lines, each prefixed with the host and unit (and attempt, after the first)."""
        tag = f"[{self.host} unit {self.unit}" + (f" attempt {self.attempt}]"
                                                  if self.attempt > 1 else "]")
        out = []
        for stream in STREAMS:
            for line in self.streams.get(stream, "").splitlines():
                out.append(f"{tag} {stream}: {line}" if stream != "stdout" else f"{tag} {line}")
        if self.error:
            out.append(f"{tag} failed: {self.error}")
            out += [f"{tag} {line}" for line in self.traceback.splitlines()]
        return out


def output_block(streams: dict[str, str] | None) -> str:
    """What a failed unit's code wrote, to show after its traceback."""
    parts = []
    for stream in STREAMS:
        text = (streams or {}).get(stream, "")
        if text:
            parts.append(f"--- what it wrote ({stream}) ---\n{text.rstrip()}\n")
    return "".join(parts)
