"""Redis I/O that every part of the client shares: redis-py's errors translated at the edge
(``translate_errors``, ``edge``), and a connection with the reads everyone makes (``Connected``).

Callers see ``RedisUnavailable`` (unreachable, refusing writes, or ``RedisFull``),
``RedisRefused``, ``JobGone`` and ``Fenced``, never redis-py's exceptions or error text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import redis
from redis.typing import EncodableT, FieldT

from .errors import InfraError, RedisFull, RedisRefused, RedisUnavailable
from .keys import Keys
from .plan import host_of

REFUSING = ("MISCONF", "LOADING", "READONLY", "MASTERDOWN", "BUSY ", "NOREPLICAS")


@contextmanager
def translate_errors(where: str) -> Iterator[None]:
    """Turn redis-py's connection and authentication errors, and Redis refusing writes, into
    ``RedisUnavailable`` (``RedisFull`` when it is out of memory)."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise RedisRefused(f"Redis at {where} refused the password: {exc}") from None
    except redis.exceptions.OutOfMemoryError as exc:
        raise RedisFull(f"Redis at {where} is out of memory: {exc}") from None
    except redis.ResponseError as exc:
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS", "invalid password", "invalid username")):
            raise RedisRefused(f"Redis at {where} refused us: {text}") from None
        if text.startswith("OOM"):
            raise RedisFull(f"Redis at {where} is out of memory: {text}") from None
        if text.startswith(REFUSING):
            raise RedisUnavailable(f"Redis at {where} refuses writes: {text}") from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"Redis at {where} is unreachable: {exc}") from None


P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="Connected")


def edge(method: Callable[Concatenate[C, P], R]) -> Callable[Concatenate[C, P], R]:
    """A method whose Redis errors are translated (see ``translate_errors``)."""

    @functools.wraps(method)
    def wrapper(self: C, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with translate_errors(self.where):
            return method(self, *args, **kwargs)

    return wrapper


def _fields(values: Mapping[str, Any]) -> Mapping[FieldT, EncodableT]:
    """``values`` as the ``mapping`` of redis-py's ``hset`` (typed invariant in its keys)."""
    return cast("Mapping[FieldT, EncodableT]", values)


def _status(reply: Any) -> str:
    return str(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])


class Connected:
    """A Redis connection with the cluster's keys; ``where`` names Redis in messages."""

    def __init__(self, client: redis.Redis, keys: Keys, where: str = "redis") -> None:
        self.client = client
        self.keys = keys
        self.where = where

    @edge
    def server_time_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @edge
    def _alive(self, zset: str, lease_ms: int) -> list[str]:
        now = self.server_time_ms()
        reply: Any = self.client.zrangebyscore(zset, now - lease_ms, "+inf")
        members: list[bytes] = reply
        return [m.decode() for m in members]

    @edge
    def live_workers(self, lease_ms: int) -> list[str]:
        """Every worker whose lease is younger than ``lease_ms``: its agent's, or its own
        (``keys``). A listing of the whole cluster: `status` and tests, not a hot path."""
        agents = self._alive(self.keys.leases, lease_ms)
        pipe = self.client.pipeline(transaction=False)
        for aid in agents:
            pipe.zrange(self.keys.agent_workers(aid), 0, -1)
        members = [w for found in (pipe.execute() if agents else []) for w in found]
        return sorted({w.decode() for w in members} | set(self._alive(self.keys.orphans,
                                                                      lease_ms)))

    @edge
    def live_capacity(self, lease_ms: int) -> tuple[int, set[str], int]:
        """How many workers hold a lease younger than ``lease_ms``, on which hosts, and how
        many agents renew them: one read per live agent, not per worker."""
        agents = self._alive(self.keys.leases, lease_ms)
        orphans = self._alive(self.keys.orphans, lease_ms)
        pipe = self.client.pipeline(transaction=False)
        for aid in agents:
            pipe.hget(self.keys.agent(aid), "leased")
        counts = pipe.execute() if agents else []
        hosts = {host_of(aid) for aid in agents} | {host_of(w) for w in orphans}
        return sum(int(c or 0) for c in counts) + len(orphans), hosts, len(agents)

    def live_agents(self, lease_ms: int) -> list[str]:
        return self._alive(self.keys.agents, lease_ms)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """``translate_errors``, and any other Redis error as an ``InfraError`` naming Redis."""
        try:
            with translate_errors(self.where):
                yield
        except redis.RedisError as exc:
            raise InfraError(f"Redis at {self.where} failed: {exc}") from None

    @staticmethod
    def _str(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def _hashes(self, keys: list[str]) -> list[dict[str, str]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [{k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                for raw in pipe.execute()] if keys else []
