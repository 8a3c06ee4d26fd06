"""The limits of a Redis that `cluster up` or a private local cluster starts, sized to the
cluster, and what Redis really runs with.

Every worker holds a connection of its own, and so does every agent. Redis accepts 10,000
clients by default, which stops a cluster at about 155 hosts of 64 cores: workers past the limit
are refused and crash-loop. So ``maxclients`` is raised to fit the cluster, with room for
reconnects, coordinators and `status`. Redis also needs a file descriptor per client: it raises
its own file limit as far as the hard limit allows and lowers ``maxclients`` to what fits, so
the limit is raised before it starts, and what it accepted is read back (``CONFIG GET``).

``maxmemory`` (with ``noeviction``: a full Redis refuses writes rather than drop units or
results) keeps Redis from taking the host's memory from the workers beside it.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass

from .broker import Broker
from .errors import InfraError, UsageError
from .settings import human_bytes

DEFAULT_MAXCLIENTS = 10_000  # Redis's own default
SPARE_CLIENTS = 100  # coordinators, `status`, `up`, `doctor`
RESERVED_FILES = 32  # descriptors Redis keeps for itself beyond its clients


# what a password holder could use to take the host, off explicitly (7.0's defaults too):
# CONFIG SET of dir, dbfilename and the like, MODULE LOAD, DEBUG
LOCKED = ("enable-protected-configs no", "enable-module-command no", "enable-debug-command no")
MIN_VERSION = (7, 0)


def check_version(host: str, binary: str, version_text: str) -> None:
    """The Redis that `up` starts is 7.0 or newer: older ones cannot refuse protected configs
    (on 6.2, CONFIG SET dir + SAVE writes a file anywhere its user may)."""
    match = re.search(r"v=(\d+)\.(\d+)(?:\.(\d+))?", version_text)
    if match is None:
        raise InfraError(f"{host}: cannot tell the version of {binary} "
                         f"({version_text.strip()[:80]!r})")
    found = tuple(int(part or 0) for part in match.groups())
    if found[:2] < MIN_VERSION:
        raise InfraError(f"{host}: {binary} is Redis {'.'.join(map(str, found))}; cluster needs "
                         "7.0 or newer (apt-get install redis-server on Debian 12 or Ubuntu "
                         "24.04, or redis.io's packages)")


def clients_needed(workers: int, agents: int) -> int:
    """Connections a cluster may hold at once: one per worker and agent, twice over (a
    reconnecting process may hold its old connection until Redis notices), and spares."""
    return 2 * (workers + agents) + SPARE_CLIENTS


def maxclients_for(workers: int, agents: int) -> int:
    return max(DEFAULT_MAXCLIENTS, clients_needed(workers, agents))


def files_for(maxclients: int) -> int:
    """The file limit Redis needs to accept ``maxclients`` clients."""
    return maxclients + RESERVED_FILES


def limit_lines(maxclients: int, maxmemory: int | None) -> list[str]:
    """redis.conf lines: clients, memory, and no eviction (results must never be dropped)."""
    lines = [f"maxclients {maxclients}", "maxmemory-policy noeviction"]
    if maxmemory:
        lines.append(f"maxmemory {maxmemory}")
    return lines


def quoted(value: str) -> str:
    """``value`` as one redis.conf argument: in double quotes, escaped; a control character
    (a newline would start a directive of its own) is refused."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError(f"{value!r} cannot go into redis.conf: it holds a control character")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def raise_file_limit(wanted: int) -> None:
    """Raise this process's file limit towards ``wanted`` as far as allowed (the hard limit,
    or beyond it for root). Safe as a ``preexec_fn``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def shell_file_limit(wanted: int) -> str:
    """A shell prefix that raises the file limit towards ``wanted``, as far as allowed."""
    return (f'[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge {wanted} ] || '
            f'ulimit -n {wanted} 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true')


@dataclass(frozen=True)
class Limits:
    """What a running Redis accepts."""

    maxclients: int
    maxmemory: int  # bytes; 0 is no limit
    policy: str

    @classmethod
    def of(cls, broker: Broker) -> Limits:
        found = broker.server_config("maxclients", "maxmemory", "maxmemory-policy")
        return cls(int(found.get("maxclients", 0)), int(found.get("maxmemory", 0)),
                   found.get("maxmemory-policy", "?"))

    def __str__(self) -> str:
        memory = human_bytes(self.maxmemory) if self.maxmemory else "no limit"
        return f"maxclients {self.maxclients}, maxmemory {memory}, {self.policy}"

    def shortfall(self, workers: int, agents: int) -> str | None:
        """Why this Redis may refuse some of the cluster's connections, or None."""
        needed = clients_needed(workers, agents)
        if self.maxclients >= needed:
            return None
        return (f"Redis accepts {self.maxclients} clients, and {workers} workers and {agents} "
                f"agents need up to {needed}: workers past the limit are refused (raise the "
                f"file limit of redis-server, ulimit -n, to at least {files_for(needed)})")
