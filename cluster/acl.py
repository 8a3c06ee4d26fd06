"""The Redis users of a Redis that `cluster up` or a private local cluster starts.

Redis's default user is disabled. Three users replace it:

- ``admin``: every command and key; used by `up`, `down` and `rotate-key` only (on the
  machine that runs them), to size Redis (``CONFIG``) and to stop it (``SHUTDOWN``).
- ``coordinator``: what `submit`, `status`, `jobs`, `logs` and `cancel` send, on the
  cluster's keys only.
- ``agent``: what agents and their workers send, on the cluster's keys only. This is the only
  Redis user whose password is on the hosts.

Neither of the last two may run ``CONFIG``, ``MODULE``, ``DEBUG``, ``FLUSHALL``/``FLUSHDB``,
``MONITOR``, ``SHUTDOWN``, ``REPLICAOF``, ``ACL`` or ``KEYS``, nor reach a key outside the
cluster's prefix, directly or through a script (Redis 7 checks the commands a script calls
against its caller's permissions). Passwords are stored in ``redis.conf`` as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

ROLES = ("admin", "coordinator", "agent")

# every command the protocol sends, and those its Lua scripts call
COMMON = (
    "ping", "hello", "auth", "client|setname", "time", "select",
    "evalsha", "eval", "script|load", "script|exists",
    "multi", "exec", "discard", "watch", "unwatch",
    "exists", "get", "set", "del", "expire", "pexpire", "pttl",
    "getbit", "setbit", "bitcount",
    "hget", "hset", "hgetall", "hmget", "hvals", "hdel", "hincrby", "hexists",
    "sadd", "srem", "smembers",
    "zadd", "zrem", "zscore", "zrange", "zrevrange", "zrangebyscore", "zcard",
    "xadd", "xack", "xdel", "xrange", "xrevrange", "xread", "xreadgroup", "xpending", "xtrim",
    "xgroup|create", "xgroup|delconsumer", "xinfo|consumers", "xinfo|groups",
)
COMMANDS = {  # and INFO (memory): is there room for a large result? how full is Redis?
    "coordinator": (*COMMON, "info"),
    "agent": (*COMMON, "info"),
}


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


@dataclass(frozen=True)
class Users:
    """The password of each role."""

    admin: str
    coordinator: str
    agent: str

    @classmethod
    def new(cls) -> Users:
        return cls(*(secrets.token_urlsafe(24) for _ in ROLES))

    def password(self, role: str) -> str:
        return str(getattr(self, role))

    def as_dict(self) -> dict[str, str]:
        return {role: self.password(role) for role in ROLES}

    def conf_lines(self, prefix: str) -> list[str]:
        """redis.conf lines: the default user off, and the three users."""
        pattern = _glob_escape(prefix) + "*"
        # off: no connection is ever the default user. Its permissions stay whole because
        # Redis 7.0 replays the AOF's transactions as the default user: with none, every
        # MULTI/EXEC in the AOF is refused on a restart and its writes are lost
        lines = ["user default off resetpass ~* &* +@all",
                 f"user admin on #{password_hash(self.admin)} ~* &* +@all"]
        for role, commands in COMMANDS.items():
            allowed = " ".join(f"+{c}" for c in commands)
            lines.append(f"user {role} on #{password_hash(self.password(role))} resetkeys "
                         f"~{pattern} resetchannels -@all {allowed}")
        return lines


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis key pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
