"""A fault-injecting TCP proxy between Redis clients and a real redis-server, for tests.

It parses RESP on both directions, so it knows where each request and each reply begins and
ends (pipelines send many requests, then read many replies; blocking reads answer late). Replies
are matched to requests in order. Faults, each drawn with a probability:

- ``lose`` (per reply): Redis ran the command, but its reply is dropped and the client's and
  the upstream connection are closed. The client sees a connection error and cannot tell
  whether its command ran. The replies before it are delivered.
- ``reset`` (per request): the connection is closed before the request is forwarded, so Redis
  never ran it (requests forwarded before it get their replies first, for up to 2 s).
- ``delay`` (per reply): the reply, and everything behind it, is held back a few ms.
- ``blackhole`` (per request): nothing more passes either way for a while, then both
  connections are closed.

Decisions come from two ``random.Random`` per connection, seeded from (seed, connection
ordinal, direction), and a fixed number of draws is made per request and per reply whether or
not a fault applies. The same seed and the same traffic give the same faults.

The handshake commands (AUTH, HELLO, CLIENT, SELECT, PING) are spared unless
``Rates.handshake`` is set, so that a reconnecting client is not failed forever. ``only``
restricts faults to some clients (e.g. ``named("worker")``, by ``CLIENT SETNAME``). Every fault
is counted in ``counters``, listed in ``faults``, and passed to ``on_fault`` if given (in the
proxy's thread, while the client's connection is still open).

Usage::

    with FaultProxy(("127.0.0.1", redis_port), seed=7, rates=Rates(lose=0.01)) as proxy:
        client = redis.Redis.from_url(proxy.url, password=password)
        ...
        with proxy.faults_off():
            ...  # look at Redis through the proxy without faults
        print(proxy.counters)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

HANDSHAKE = frozenset({b"AUTH", b"HELLO", b"CLIENT", b"SELECT", b"PING"})
READ_SIZE = 1 << 18
DRAIN_S = 2.0  # a reset waits this long at most for the replies of requests already forwarded

_AGGREGATE = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2}  # elements per count
_BULK = frozenset(map(ord, "$=!"))
_SIMPLE = frozenset(map(ord, "+-:_,#("))
_ATTRIBUTE, _PUSH = ord("|"), ord(">")


class ProtocolError(Exception):
    """The bytes are not RESP (or not RESP we understand)."""


# -- RESP framing --------------------------------------------------------------------------


def frame_end(buf: bytes | bytearray, pos: int = 0) -> int:
    """The offset just past the RESP value that starts at ``pos``, or -1 when ``buf`` does
    not hold all of it yet. Raises ``ProtocolError`` on bytes that are not RESP."""
    todo = 1
    size = len(buf)
    while todo:
        if pos >= size:
            return -1
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        kind = buf[pos]
        if kind in _SIMPLE:
            pos = eol + 2
        elif kind in _BULK:
            length = _length(buf, pos, eol)
            pos = eol + 2 if length < 0 else eol + length + 4
            if pos > size:
                return -1
        elif kind in _AGGREGATE or kind == _ATTRIBUTE:
            count = _length(buf, pos, eol)
            per = 2 if kind == _ATTRIBUTE else _AGGREGATE[kind]
            todo += max(count, 0) * per + (1 if kind == _ATTRIBUTE else 0)
            pos = eol + 2
        else:
            raise ProtocolError(f"not RESP: {bytes(buf[pos:pos + 16])!r}")
        todo -= 1
    return pos


def _length(buf: bytes | bytearray, pos: int, eol: int) -> int:
    try:
        return int(buf[pos + 1:eol])
    except ValueError:
        raise ProtocolError(f"bad length: {bytes(buf[pos:eol])!r}") from None


def request_words(frame: bytes | bytearray, limit: int = 3) -> list[bytes]:
    """The first ``limit`` arguments of a request (an array of bulk strings), uppercased
    except the third (a name, as in ``CLIENT SETNAME name``)."""
    if frame[:1] != b"*":
        raise ProtocolError(f"a request is an array, not {bytes(frame[:16])!r}")
    eol = frame.find(b"\r\n")
    count = min(_length(frame, 0, eol), limit)
    pos, words = eol + 2, list[bytes]()
    for _ in range(count):
        eol = frame.find(b"\r\n", pos)
        length = _length(frame, pos, eol)
        word = bytes(frame[eol + 2:eol + 2 + length])
        words.append(word if len(words) == 2 else word.upper())
        pos = eol + 4 + length
    return words


def split_frames(buf: bytearray) -> list[bytes]:
    """Remove and return the complete RESP values at the start of ``buf``."""
    frames: list[bytes] = []
    pos = 0
    while True:
        end = frame_end(buf, pos)
        if end < 0:
            break
        frames.append(bytes(buf[pos:end]))
        pos = end
    del buf[:pos]
    return frames


# -- configuration and bookkeeping ---------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Probabilities of each fault (0 to 1), and how big a delay or a black hole is."""

    lose: float = 0.0  # per reply
    reset: float = 0.0  # per request
    delay: float = 0.0  # per reply
    blackhole: float = 0.0  # per request
    delay_ms: tuple[float, float] = (1.0, 50.0)
    blackhole_s: tuple[float, float] = (0.5, 2.0)
    handshake: bool = False  # fault AUTH, HELLO, CLIENT, SELECT and PING too


OFF = Rates()


@dataclass(frozen=True)
class Client:
    """A client connection as the proxy sees it: accept order, peer, ``CLIENT SETNAME``."""

    ordinal: int
    peer: str
    name: str | None = None


@dataclass(frozen=True)
class Fault:
    """One fault injected: on which connection, at which request or reply, on what command."""

    ordinal: int
    kind: str  # lose, reset, delay, blackhole
    index: int  # the request's or reply's position on its connection
    command: str
    peer: str = field(default="", compare=False)  # the client's address, while it is open


@dataclass
class Counters:
    """What passed and what was injected (read by tests; written by the proxy's thread)."""

    connections: int = 0
    requests: int = 0
    replies: int = 0
    lost: int = 0
    resets: int = 0
    delays: int = 0
    blackholes: int = 0
    refused: int = 0  # the upstream could not be reached
    protocol_errors: int = 0  # bytes that were not RESP: the connection was closed
    lost_commands: Counter[str] = field(default_factory=Counter)

    @property
    def faults(self) -> int:
        return self.lost + self.resets + self.delays + self.blackholes


def named(*names: str) -> Callable[[Client], bool]:
    """A client filter: only connections that sent ``CLIENT SETNAME`` with one of ``names``."""
    wanted = set(names)
    return lambda client: client.name in wanted


# -- the proxy -----------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (a free port) in front of ``upstream``, injecting faults.

    It runs in its own thread and event loop, between ``start()`` and ``stop()`` (or as a
    context manager). ``rates`` can be changed at any time (``set_rates``, ``faults_off``);
    ``only`` restricts faults to the clients it accepts (default: every client).
    """

    def __init__(self, upstream: tuple[str, int], *, seed: int = 0, rates: Rates = OFF,
                 only: Callable[[Client], bool] | None = None,
                 on_fault: Callable[[Fault], None] | None = None) -> None:
        self.upstream = upstream
        self.seed = seed
        self.rates = rates
        self.only = only
        self.on_fault = on_fault  # called in the proxy's thread as a fault is injected
        self.counters = Counters()
        self.faults: list[Fault] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._ordinal = 0
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """A redis:// URL (database 0) that reaches the upstream through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def set_rates(self, rates: Rates) -> None:
        """Use these fault rates from now on (also for connections already open)."""
        self.rates = rates

    @contextlib.contextmanager
    def faults_off(self) -> Iterator[None]:
        """No fault is injected inside the block; the previous rates come back after it."""
        saved, self.rates = self.rates, OFF
        try:
            yield
        finally:
            self.rates = saved

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Listen, in a background thread; returns once ``port`` is set."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                        name=f"faultproxy-{self.seed}")
        self._thread.start()
        ready.wait(10)
        if self._error is not None or not self.port:
            self._thread.join(10)
            raise RuntimeError(f"fault proxy did not start: {self._error!r}")

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)

    def _serve(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0))
            self.port = int(self._server.sockets[0].getsockname()[1])
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        ready.set()
        try:
            if self._error is None:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._ordinal += 1
        self.counters.connections += 1
        peer = writer.get_extra_info("peername")
        link = _Link(self, Client(self._ordinal, f"{peer[0]}:{peer[1]}" if peer else "?"),
                     reader, writer)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # stop(): asyncio would report a cancelled connection callback as an error
        finally:
            self._links.discard(task)

    def _note(self, fault: Fault) -> None:
        self.faults.append(fault)
        if self.on_fault is not None:
            self.on_fault(fault)
        if fault.kind == "lose":
            self.counters.lost += 1
            self.counters.lost_commands[fault.command] += 1
        elif fault.kind == "reset":
            self.counters.resets += 1
        elif fault.kind == "delay":
            self.counters.delays += 1
        else:
            self.counters.blackholes += 1


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


@dataclass
class _InFlight:
    command: str
    spared: bool


class _Link:
    """One client connection and its upstream connection: two pumps, one per direction."""

    def __init__(self, proxy: FaultProxy, client: Client, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.creader, self.cwriter = reader, writer
        self.uwriter: asyncio.StreamWriter | None = None
        seed = f"{proxy.seed}:{client.ordinal}"
        self.request_rng = random.Random(f"{seed}:requests")
        self.reply_rng = random.Random(f"{seed}:replies")
        self.inflight: deque[_InFlight] = deque()
        self.requests_seen = 0
        self.replies_seen = 0
        self.holding = False  # black-holed: nothing passes any more
        self.draining = False  # reset decided: close once the forwarded requests are answered
        self.drained = asyncio.Event()

    async def run(self) -> None:
        try:
            try:
                ureader, self.uwriter = await asyncio.open_connection(*self.proxy.upstream)
            except OSError:
                self.proxy.counters.refused += 1
                return
            pumps = [asyncio.create_task(self.pump_requests()),
                     asyncio.create_task(self.pump_replies(ureader))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                ends = await asyncio.gather(*pumps, return_exceptions=True)
            if any(isinstance(end, ProtocolError) for end in ends):
                self.proxy.counters.protocol_errors += 1
        finally:
            await _close(self.cwriter)
            await _close(self.uwriter)

    # -- client -> Redis -------------------------------------------------------------------

    async def pump_requests(self) -> None:
        """Forward requests until the client leaves or a fault ends the connection."""
        buf = bytearray()
        assert self.uwriter is not None
        while chunk := await self._read(self.creader):
            buf += chunk
            out: list[bytes] = []
            for frame in split_frames(buf):
                stop = self._request(frame, out)
                if stop:
                    self.uwriter.write(b"".join(out))
                    await stop
                    return
            self.uwriter.write(b"".join(out))
            await self.uwriter.drain()

    def _request(self, frame: bytes, out: list[bytes]) -> Coroutine[Any, Any, None] | None:
        """Queue ``frame`` for Redis in ``out``, or return what ends the connection."""
        words = request_words(frame)
        command = b" ".join(words[:2] if words[:1] == [b"CLIENT"] else words[:1]).decode()
        if words[:2] == [b"CLIENT", b"SETNAME"] and len(words) > 2:
            self.client = replace(self.client, name=words[2].decode(errors="replace"))
        spared = bool(words) and words[0] in HANDSHAKE
        index, self.requests_seen = self.requests_seen, self.requests_seen + 1
        self.proxy.counters.requests += 1
        rates = self.proxy.rates
        draw = self.request_rng.random
        u_reset, u_hole, size = draw(), draw(), draw()
        if self._eligible(spared):
            if u_reset < rates.reset:
                self._fault("reset", index, command)
                return self._reset()
            if u_hole < rates.blackhole:
                self._fault("blackhole", index, command)
                return self._blackhole(_between(rates.blackhole_s, size))
        self.inflight.append(_InFlight(command, spared))
        out.append(frame)
        return None

    async def _reset(self) -> None:
        """Close once every request already forwarded has its reply (2 s at most)."""
        self.draining = True
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), DRAIN_S)

    async def _blackhole(self, seconds: float) -> None:
        """Hold everything for ``seconds`` (the client's data is read and discarded)."""
        self.holding = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while await self._read(self.creader):
                    pass

    # -- Redis -> client -------------------------------------------------------------------

    async def pump_replies(self, ureader: asyncio.StreamReader) -> None:
        """Forward replies until Redis closes or a fault ends the connection."""
        buf = bytearray()
        while chunk := await self._read(ureader):
            if self.holding:
                continue
            buf += chunk
            out: list[bytes] = []
            for frame in split_frames(buf):
                action = self._reply(frame)
                if action == "lose":
                    await self._send(out)
                    return
                if isinstance(action, float):
                    await self._send(out)
                    await asyncio.sleep(action)
                    if self.holding:
                        break
                out.append(frame)
            await self._send(out)
            if self.draining and not self.inflight:
                self.drained.set()
                return

    def _reply(self, frame: bytes) -> str | float | None:
        """What to do with one reply: pass it (None), ``"lose"`` it, or delay it (seconds)."""
        if frame[:1] == b">" or not self.inflight:  # a push, or nothing asked: pass
            return None
        request = self.inflight.popleft()
        index, self.replies_seen = self.replies_seen, self.replies_seen + 1
        self.proxy.counters.replies += 1
        rates = self.proxy.rates
        draw = self.reply_rng.random
        u_lose, u_delay, size = draw(), draw(), draw()
        if not self._eligible(request.spared):
            return None
        if u_lose < rates.lose:
            self._fault("lose", index, request.command)
            return "lose"
        if u_delay < rates.delay:
            self._fault("delay", index, request.command)
            return _between(rates.delay_ms, size) / 1000
        return None

    async def _send(self, out: list[bytes]) -> None:
        if out and not self.holding:
            self.cwriter.write(b"".join(out))
            await self.cwriter.drain()
        out.clear()

    # -- helpers ---------------------------------------------------------------------------

    def _fault(self, kind: str, index: int, command: str) -> None:
        self.proxy._note(Fault(self.client.ordinal, kind, index, command, self.client.peer))

    def _eligible(self, spared: bool) -> bool:
        proxy = self.proxy
        if spared and not proxy.rates.handshake:
            return False
        return proxy.only is None or proxy.only(self.client)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> bytes:
        """The next bytes, or b"" when the peer closed or reset the connection."""
        try:
            return await reader.read(READ_SIZE)
        except OSError:
            return b""


def _between(bounds: tuple[float, float], u: float) -> float:
    low, high = bounds
    return low + (high - low) * u
