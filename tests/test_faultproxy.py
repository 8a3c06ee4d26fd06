"""The fault proxy itself, against the session's real redis-server: transparent with faults
off, each fault does what it says, and the faults follow from the seed."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
from faultproxy import FaultProxy, ProtocolError, Rates, frame_end, named, split_frames
from redis.backoff import NoBackoff
from redis.retry import Retry

Server = tuple[str, int, str]  # host, port, password


@pytest.fixture
def server(redis_server: tuple[str, str]) -> Server:
    url, password = redis_server
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379, password


@pytest.fixture
def proxy(server: Server, caplog: pytest.LogCaptureFixture) -> Iterator[FaultProxy]:
    """A proxy with faults off; fails the test if asyncio reported any error meanwhile."""
    with caplog.at_level(logging.WARNING, logger="asyncio"), \
            FaultProxy(server[:2], seed=1) as running:
        yield running
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def client(url: str, password: str, **kwargs: object) -> redis.Redis:
    """A redis-py client that does not retry, so that every fault shows."""
    return redis.Redis.from_url(url, password=password, retry=Retry(NoBackoff(), 0),
                                **kwargs)  # type: ignore[arg-type]


def key() -> str:
    return f"fp:{secrets.token_hex(6)}"


# -- RESP framing ----------------------------------------------------------------------------

REPLIES = [b"+OK\r\n", b"-ERR wrong\r\n", b":42\r\n", b"$-1\r\n", b"*-1\r\n", b"$0\r\n\r\n",
           b"$5\r\nhe\r\nl\r\n", b"*0\r\n", b"*2\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n",
           b"%1\r\n+k\r\n*1\r\n_\r\n", b"|1\r\n+a\r\n:1\r\n+value\r\n"]


@pytest.mark.parametrize("frame", REPLIES)
def test_frame_end_finds_the_end_of_each_value_and_nothing_before(frame: bytes) -> None:
    assert frame_end(frame + b"+next\r\n") == len(frame)
    for cut in range(len(frame)):
        assert frame_end(frame[:cut]) == -1


def test_split_frames_keeps_an_incomplete_value_for_later() -> None:
    buf = bytearray(b"+OK\r\n:1\r\n$10\r\nabc")
    assert split_frames(buf) == [b"+OK\r\n", b":1\r\n"]
    assert buf == b"$10\r\nabc"


def test_bytes_that_are_not_resp_are_refused() -> None:
    with pytest.raises(ProtocolError):
        frame_end(b"GET x\r\n")


# -- transparent with faults off --------------------------------------------------------------


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def exchange(port: int, requests: bytes, replies: int) -> bytes:
    """Send raw bytes and read exactly ``replies`` RESP replies, as raw bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)
        data = bytearray()
        pos = 0
        for _ in range(replies):
            while (end := frame_end(data, pos)) < 0:
                chunk = sock.recv(1 << 20)
                assert chunk, "connection closed early"
                data += chunk
            pos = end
        assert pos == len(data)
        return bytes(data)


def test_replies_pass_byte_exact(server: Server, proxy: FaultProxy) -> None:
    """The same requests (a pipeline, an 8 MB value, errors, nulls, a blocking read that
    times out) give the same bytes through the proxy as from Redis directly."""
    k = key().encode()
    big = secrets.token_bytes(8 << 20)
    script = [resp(b"AUTH", server[2].encode()), resp(b"SET", k, big), resp(b"GET", k),
              resp(b"GET", k + b":none"), resp(b"HSET", k + b":h", b"f", b"v"),
              resp(b"INCR", k + b":h"), resp(b"XADD", k + b":s", b"1-1", b"f", b"v"),
              resp(b"XREAD", b"COUNT", b"5", b"STREAMS", k + b":s", b"0"),
              resp(b"XREAD", b"BLOCK", b"100", b"STREAMS", k + b":s", b"$")]
    script += [resp(b"INCR", k + b":n") for _ in range(500)]
    script.append(resp(b"DEL", k, k + b":h", k + b":s", k + b":n"))
    requests = b"".join(script)
    through = exchange(proxy.port, requests, len(script))
    direct = exchange(server[1], requests, len(script))
    assert through == direct
    assert big in through
    assert proxy.counters.replies == len(script) and proxy.counters.faults == 0


def test_a_blocking_read_is_answered_late(server: Server, proxy: FaultProxy) -> None:
    stream = key()
    got: list[object] = []
    reader = client(proxy.url, server[2])
    thread = threading.Thread(target=lambda: got.append(
        reader.xread({stream: "$"}, block=10_000)))
    thread.start()
    wait_for_blocked_read(server)
    direct = client(f"redis://127.0.0.1:{server[1]}/0", server[2])
    direct.xadd(stream, {"f": "v"}, id="5-1")
    thread.join(10)
    assert got == [[[stream.encode(), [(b"5-1", {b"f": b"v"})]]]]
    direct.delete(stream)


def test_a_large_pipeline_through_redis_py(server: Server, proxy: FaultProxy) -> None:
    r = client(proxy.url, server[2])
    k = key()
    values = [secrets.token_bytes(1 << 20) for _ in range(8)]
    pipe = r.pipeline(transaction=False)
    for i, value in enumerate(values):
        pipe.hset(k, str(i), value)
    pipe.hgetall(k)
    pipe.delete(k)
    replies = pipe.execute()
    assert replies[-2] == {str(i).encode(): v for i, v in enumerate(values)}


# -- each fault ----------------------------------------------------------------------------


def test_a_lost_reply_was_executed(server: Server, proxy: FaultProxy) -> None:
    r = client(proxy.url, server[2])
    k = key()
    r.ping()
    proxy.set_rates(Rates(lose=1.0))
    with pytest.raises(redis.ConnectionError):
        r.set(k, "v")
    with proxy.faults_off():
        assert r.get(k) == b"v"  # Redis ran it; the client could not know
        r.delete(k)
    assert proxy.counters.lost == 1 and proxy.counters.lost_commands == {"SET": 1}


def test_a_reset_request_was_not_executed(server: Server, proxy: FaultProxy) -> None:
    r = client(proxy.url, server[2])
    k = key()
    r.ping()
    proxy.set_rates(Rates(reset=1.0))
    with pytest.raises(redis.ConnectionError):
        r.set(k, "v")
    proxy.set_rates(Rates())
    assert r.exists(k) == 0
    assert proxy.counters.resets == 1


def test_a_reset_mid_pipeline_answers_what_ran_before_it(server: Server, proxy: FaultProxy
                                                         ) -> None:
    """Requests forwarded before the reset get their replies; the rest never reach Redis."""
    k = key().encode()
    proxy.set_rates(Rates(reset=1.0))
    requests = resp(b"AUTH", server[2].encode()) + resp(b"PING") + resp(b"SET", k, b"v")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(requests)
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
    assert data == b"+OK\r\n+PONG\r\n"  # then the connection was closed
    proxy.set_rates(Rates())
    assert client(proxy.url, server[2]).exists(k) == 0


def test_a_delayed_reply_arrives_late(server: Server, proxy: FaultProxy) -> None:
    r = client(proxy.url, server[2])
    r.ping()
    proxy.set_rates(Rates(delay=1.0, delay_ms=(200.0, 200.0)))
    started = time.monotonic()
    assert r.echo("hello") == b"hello"
    assert time.monotonic() - started >= 0.2
    assert proxy.counters.delays == 1


def test_a_blackhole_holds_then_closes(server: Server, proxy: FaultProxy) -> None:
    r = client(proxy.url, server[2], socket_timeout=5)
    k = key()
    r.ping()
    proxy.set_rates(Rates(blackhole=1.0, blackhole_s=(0.3, 0.3)))
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        r.set(k, "v")
    assert 0.3 <= time.monotonic() - started < 4
    proxy.set_rates(Rates())
    assert r.exists(k) == 0
    assert proxy.counters.blackholes == 1


def test_the_handshake_is_spared_unless_asked(server: Server, proxy: FaultProxy) -> None:
    proxy.set_rates(Rates(lose=1.0))
    r = client(proxy.url, server[2])
    with pytest.raises(redis.ConnectionError):
        r.get("x")
    assert set(proxy.counters.lost_commands) == {"GET"}  # the handshake passed
    proxy.set_rates(Rates(lose=1.0, handshake=True))
    with pytest.raises(redis.ConnectionError):
        client(proxy.url, server[2]).get("x")
    # redis-py opens with HELLO (AUTH inside) where the server speaks it, else with AUTH
    assert set(proxy.counters.lost_commands) - {"GET"} in ({"HELLO"}, {"AUTH"})


def test_faults_only_for_the_named_clients(server: Server) -> None:
    with FaultProxy(server[:2], rates=Rates(lose=1.0), only=named("victim")) as proxy:
        spared = client(proxy.url, server[2], client_name="bystander")
        assert spared.echo("hi") == b"hi"
        victim = client(proxy.url, server[2], client_name="victim")
        with pytest.raises(redis.ConnectionError):
            victim.echo("hi")
        assert proxy.counters.lost == 1


# -- determinism, and a clean stop ---------------------------------------------------------------


def traffic(proxy: FaultProxy, password: str) -> list[str]:
    """The same sequence of commands, one at a time; what each one gave."""
    r = client(proxy.url, password)
    k = key()
    outcomes = []
    for i in range(150):
        try:
            r.set(f"{k}:{i % 7}", i) if i % 3 else r.get(f"{k}:{i % 7}")
            outcomes.append("ok")
        except redis.ConnectionError:
            outcomes.append("error")
    with proxy.faults_off():
        r.delete(*[f"{k}:{j}" for j in range(7)])
    return outcomes


def test_the_same_seed_gives_the_same_faults(server: Server) -> None:
    rates = Rates(lose=0.05, reset=0.05, delay=0.05, delay_ms=(0.0, 2.0))
    runs = []
    for seed in (3, 3, 4):
        with FaultProxy(server[:2], seed=seed, rates=rates) as proxy:
            runs.append((traffic(proxy, server[2]), proxy.faults))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) >= 5  # the test did inject faults
    assert runs[0] != runs[2]


def wait_for_blocked_read(server: Server) -> None:
    direct = client(f"redis://127.0.0.1:{server[1]}/0", server[2])
    while not any(c.get("cmd") == "xread" for c in direct.client_list()):
        time.sleep(0.01)


def test_stop_closes_every_connection(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        proxy = FaultProxy(server[:2])
        proxy.start()
        r = client(proxy.url, server[2])
        outcome: list[BaseException] = []

        def blocked_read() -> None:
            try:
                r.xread({key(): "$"}, block=10_000)
            except redis.ConnectionError as exc:
                outcome.append(exc)

        reader = threading.Thread(target=blocked_read)
        reader.start()
        wait_for_blocked_read(server)
        proxy.stop()
        reader.join(5)
        assert len(outcome) == 1  # the blocked client was disconnected, not left hanging
        assert proxy._thread is not None and not proxy._thread.is_alive()
        with pytest.raises(redis.ConnectionError):
            client(proxy.url, server[2]).ping()  # nothing listens any more
        proxy.stop()  # again: nothing to do
    assert [rec.getMessage() for rec in caplog.records if rec.name == "asyncio"] == []
