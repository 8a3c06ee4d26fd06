"""Units encoded and sealed a batch at a time: one JSON encoding and one tag for a whole
work entry instead of one per unit (``Packer``, on the coordinator), opened again by the
worker (``unpack``).

A packed entry names its units (index -> empty value, for the scripts that reissue, copy and
record them) and carries ``p``: ``codec.encode([[index, unit], ...])`` sealed as
``("units", job id)``. A batch is packed when it has more than one unit and fits in the
batch's byte bound; otherwise (one unit, large units, or a unit the codec refuses, which is
then named) each unit is encoded and sealed on its own as ``("unit", job id, index)``.

A packed entry cannot be cut by a Lua script. When a worker dies computing one, ``REISSUE``
queues it whole, marked ``s``, and the worker that takes it replaces it with one entry per
unit (``Broker.split``), each unit encoded and sealed on its own (workers hold the message
key), so that a unit that kills its worker is isolated as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import codec
from .entries import Batch, Work
from .errors import CodecError
from .signing import Sealer

Units = list[tuple[int, Any]]


class Packer:
    """Encodes the units of a batch, packed when that is worth it. ``single`` encodes and
    seals one unit (raising the coordinator's error for a unit that cannot be queued)."""

    def __init__(self, sealer: Sealer, max_bytes: int,
                 single: Callable[[int, Any], bytes]) -> None:
        self.sealer = sealer
        self.max_bytes = max_bytes
        self.single = single
        self.unit_bytes = 0.0  # encoded bytes per unit, from the last batch

    def batch(self, jid: str, units: Units) -> tuple[Batch, Units]:
        """The batch of ``units`` (or of their first ones, up to the byte bound), and the
        units left over for the next batch."""
        if len(units) > 1 and self.unit_bytes * len(units) <= self.max_bytes:
            try:
                blob = codec.encode([[i, u] for i, u in units])
            except CodecError:  # encoded one by one below, which names the unit
                blob = b""
            if blob and len(blob) <= self.max_bytes:
                self.unit_bytes = len(blob) / len(units)
                return Batch([(i, b"") for i, _ in units],
                             self.sealer.seal(blob, "units", jid)), []
        encoded: list[tuple[int, bytes]] = []
        size = 0
        for n, (index, unit) in enumerate(units):
            if encoded and size >= self.max_bytes:
                self.unit_bytes = size / len(encoded)
                return Batch(encoded), units[n:]
            encoded.append((index, self.single(index, unit)))
            size += len(encoded[-1][1])
        self.unit_bytes = size / max(len(encoded), 1)
        return Batch(encoded), []


def unpack(sealer: Sealer, work: Work) -> dict[int, Any]:
    """The units of a packed entry by index, as the coordinator encoded them; ``Forged`` when
    its blob is not sealed for its job, ``CodecError`` when it does not decode as a packed
    batch."""
    value = codec.decode(sealer.open(work.packed, "units", work.jid))
    if not isinstance(value, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
            and not isinstance(pair[0], bool) for pair in value):
        raise CodecError("a packed entry that is not a list of [index, unit]")
    return {index: unit for index, unit in value}

