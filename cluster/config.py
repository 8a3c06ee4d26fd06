"""hosts.ini: the only reader. Parsed once into frozen dataclasses; errors name file, line, key.

    [cluster]
    name = lab                      ; names the key prefix and the local state directory
    redis = node1                   ; a host below (up starts Redis there) or redis://host:port
    redis_port = 6379               ; for a Redis that up starts
    user = root                     ; SSH defaults for every host ...
    port = 22
    identity_file = ~/.ssh/id_ed25519
    known_hosts = ~/.config/cluster/lab/known_hosts
    install_dir = ~/.cluster/lab    ; on the hosts (as root: /var/lib/cluster/lab)
    python = python3                ; on the hosts
    state_dir = ~/.config/cluster/lab   ; on this machine: credentials, known_hosts
    connect_timeout = 10            ; seconds, for SSH
    redis_grace = 60                ; agents stop when Redis is unreachable this long
    heartbeat = 0.5                 ; agents renew heartbeats and leases this often (seconds)
    lease = 5                       ; a worker not renewed this long is lost (submit --lease)
    redis_maxmemory = 50%           ; for a Redis that up starts: of the host's RAM, or 4gb
    history_days = 30               ; how long Redis keeps the records of runs (cluster jobs)
    worker_user = cluster-worker    ; as root on a host, up runs the workers (job code) and
    redis_user = cluster-redis      ;   Redis as these system users (made if missing); root: not
    tls = yes                       ; a Redis that up starts speaks TLS only (its own CA)
    data_path = yes                 ; agents serve large results to coordinators on their
                                    ;   address (no: every result through Redis, for hosts
                                    ;   that coordinators cannot reach but on Redis's port)
    tls_ca = ...                    ; for a rediss:// Redis run by someone else: its CA, and
    tls_cert = ... / tls_key = ...  ;   a client certificate if it asks for one (paths here)
    requirements =                  ; what up builds into the wheelhouse and installs on hosts:
        scipy>=1.11                 ;   one per line: a requirement (from an index, on this
        ./tools/mylib               ;   machine), or a local project directory or wheel

    [host node1]                    ; one section per host
    address = 10.0.0.11             ; default: the section's name
    cores = 8                       ; or cpus = 0-3,8-11 (default: all)
    user = ... / port = ... / python = ... / install_dir = ... / identity_file = ...

Precedence, lowest first: built-in defaults < [cluster] < [host NAME].
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .errors import UsageError
from .requirements import parse
from .settings import Memory, Range, parse_cpus

CLUSTER_KEYS = {"name", "redis", "redis_port", "user", "port", "identity_file", "known_hosts",
                "install_dir", "python", "state_dir", "connect_timeout", "redis_grace",
                "heartbeat", "lease", "redis_maxmemory", "requirements", "history_days",
                "tls", "tls_ca", "tls_cert", "tls_key", "worker_user", "redis_user",
                "data_path"}
HOST_KEYS = {"address", "cores", "cpus", "user", "port", "python", "install_dir",
             "identity_file"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class ConfigError(UsageError):
    """A problem in hosts.ini, with the place it is at."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class HostConfig:
    name: str
    address: str
    user: str
    port: int
    python: str
    install_dir: str  # "": the default (``Remote``): ~/.cluster/NAME, as root /var/lib/cluster/NAME
    identity_file: str | None
    cpus: str | None = None
    cores: int | None = None

    def cpu_count(self) -> int | None:
        """How many workers its agent runs, where hosts.ini says (cores or cpus)."""
        return len(parse_cpus(self.cpus)) if self.cpus else self.cores

    def agent_cpu_args(self) -> list[str]:
        if self.cpus:
            return ["--cpus", self.cpus]
        if self.cores:
            return ["--cores", str(self.cores)]
        return []


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    name: str
    hosts: tuple[HostConfig, ...]
    redis_url: str | None  # an existing Redis
    redis_host: str | None  # or the host on which up starts one
    redis_port: int
    state_dir: Path
    known_hosts: Path
    connect_timeout: float
    redis_grace: float = 60.0
    heartbeat: float = settings.HEARTBEAT_S
    lease: float = settings.LEASE_S
    redis_maxmemory: Memory = Memory()
    requirements: tuple[str, ...] = ()  # for pip, from an index or from the wheelhouse
    packages: tuple[Path, ...] = ()  # local project directories and wheels, built by up
    history_days: float = settings.DEFAULT_HISTORY_DAYS  # run records kept in Redis this long
    tls: bool = True  # a Redis that up starts: TLS only, certificates from the cluster's CA
    tls_files: tuple[Path | None, Path | None, Path | None] = (None, None, None)  # CA, cert, key
    worker_user: str = "cluster-worker"  # as root on a host: the workers' user ("root": none)
    redis_user: str = "cluster-redis"  # and the user of the Redis that up starts
    data_path: bool = True  # agents serve large results on their address (``dataserver``)

    @property
    def prefix(self) -> str:
        return f"{self.name}:"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    def host(self, name: str) -> HostConfig:
        return next(h for h in self.hosts if h.name == name)

    def workers(self, guess: int) -> int:
        """Workers of the whole cluster, counting ``guess`` for a host that uses all its CPUs."""
        return sum(h.cpu_count() or guess for h in self.hosts)

    def redis_address(self) -> str:
        """redis://host:port that every host and this machine use."""
        if self.redis_url:
            return self.redis_url
        assert self.redis_host is not None
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host(self.redis_host).address}:{self.redis_port}/0"

    @property
    def tls_dir(self) -> Path:
        """The cluster's CA and the Redis host's certificate (``tls.py``), on this machine."""
        return self.state_dir / "tls"


class _Lines:
    """Line numbers of sections and keys, which configparser does not keep."""

    def __init__(self, text: str) -> None:
        self.sections: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        section = ""
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("[") and "]" in stripped:
                section = stripped[1:stripped.index("]")].strip()
                self.sections.setdefault(section, number)
            elif stripped and not stripped.startswith(("#", ";")) and not line[0].isspace():
                key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
                self.keys.setdefault((section, key), number)

    def of(self, section: str, key: str | None = None) -> int | None:
        if key is None:
            return self.sections.get(section)
        return self.keys.get((section, key), self.sections.get(section))


def load(path: str | Path, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read and validate hosts.ini."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read it: {exc.strerror}") from None
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(text, source=str(file))
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        first = str(exc).splitlines()[0]
        raise ConfigError(file, line, f"not a valid INI file: {first}") from None
    return _Parsed(file, parser, _Lines(text)).config()


class _Parsed:
    def __init__(self, path: Path, parser: configparser.ConfigParser, lines: _Lines) -> None:
        self.path = path
        self.parser = parser
        self.lines = lines

    def error(self, section: str, key: str | None, problem: str) -> ConfigError:
        prefix = f"[{section}] {key}: " if key else f"[{section}]: "
        return ConfigError(self.path, self.lines.of(section, key), prefix + problem)

    def config(self) -> ClusterConfig:
        if not self.parser.has_section("cluster"):
            raise ConfigError(self.path, None, "no [cluster] section")
        host_sections = []
        for section in self.parser.sections():
            if section == "cluster":
                continue
            kind, _, name = section.partition(" ")
            if kind != "host" or not NAME.match(name.strip()):
                raise self.error(section, None, "unknown section; expected [cluster] or "
                                 "[host NAME] (NAME of letters, digits, '.', '_', '-')")
            host_sections.append(section)
        if not host_sections:
            raise ConfigError(self.path, None, "no [host NAME] section: list at least one host")
        cluster = self.parser["cluster"]
        self.check_keys("cluster", CLUSTER_KEYS)
        name = cluster.get("name", "cluster").strip()
        if not NAME.match(name):
            raise self.error("cluster", "name", f"{name!r} is not a valid cluster name")
        defaults = {
            "user": cluster.get("user", "root"), "port": cluster.get("port", "22"),
            "python": cluster.get("python", "python3"),
            "install_dir": cluster.get("install_dir", ""),
            "identity_file": cluster.get("identity_file"),
        }
        self.number("port", settings.PORT, 22)  # a bad default is reported where it is
        hosts = tuple(self.host(section, defaults) for section in host_sections)
        self.check_unique(hosts, host_sections)
        state_dir = Path(cluster.get("state_dir", f"~/.config/cluster/{name}")).expanduser()
        redis_url, redis_host = self.redis(cluster.get("redis", "").strip(), hosts)
        heartbeat = self.number("heartbeat", settings.HEARTBEAT, settings.HEARTBEAT_S)
        requirements, packages = self.requirements()
        return ClusterConfig(
            path=self.path, name=name, hosts=hosts, redis_url=redis_url, redis_host=redis_host,
            redis_port=int(self.number("redis_port", settings.PORT, 6379)),
            state_dir=state_dir,
            known_hosts=Path(cluster.get("known_hosts", str(state_dir / "known_hosts")))
            .expanduser(),
            connect_timeout=self.number("connect_timeout", settings.CONNECT_TIMEOUT, 10.0),
            redis_grace=self.number("redis_grace", settings.REDIS_GRACE, 60.0),
            heartbeat=heartbeat, lease=self.lease(heartbeat), redis_maxmemory=self.memory(),
            requirements=requirements, packages=packages,
            history_days=self.number("history_days", settings.HISTORY_DAYS,
                                     settings.DEFAULT_HISTORY_DAYS),
            tls=self.flag("tls", True), tls_files=self.tls_files(),
            worker_user=self.user("worker_user", "cluster-worker"),
            redis_user=self.user("redis_user", "cluster-redis"),
            data_path=self.flag("data_path", True))

    def host(self, section: str, defaults: dict[str, str | None]) -> HostConfig:
        self.check_keys(section, HOST_KEYS)
        values = self.parser[section]
        cpus = values.get("cpus")
        cores = values.get("cores")
        if cpus and cores:
            raise self.error(section, "cpus", "give cores or cpus, not both")
        if cpus:
            try:
                parse_cpus(cpus)
            except UsageError as exc:
                raise self.error(section, "cpus", str(exc)) from None
        name = section.partition(" ")[2].strip()
        return HostConfig(
            name=name, address=values.get("address", name).strip(),
            user=values.get("user", defaults["user"] or "root"),
            port=self.integer(section, "port", values.get("port", defaults["port"] or "22"),
                              settings.PORT),
            python=values.get("python", defaults["python"] or "python3"),
            install_dir=values.get("install_dir", defaults["install_dir"] or ""),
            identity_file=values.get("identity_file", defaults["identity_file"]),
            cpus=cpus, cores=self.integer(section, "cores", cores, settings.CORES)
            if cores else None)

    def redis(self, value: str, hosts: tuple[HostConfig, ...]) -> tuple[str | None, str | None]:
        if not value:
            raise self.error("cluster", "redis", "missing: name a host below, on which up "
                             "starts Redis, or give redis://host:port of a running one")
        if value.startswith(("redis://", "rediss://")):
            return value, None
        if value not in {h.name for h in hosts}:
            raise self.error("cluster", "redis", f"{value!r} is neither a redis:// URL nor a "
                             f"host in this file ({', '.join(h.name for h in hosts)})")
        return None, value

    def user(self, key: str, default: str) -> str:
        value = self.parser["cluster"].get(key, default).strip()
        if not USER.match(value):
            raise self.error("cluster", key, f"{value!r} is not a user name (lower-case letters, "
                             "digits, '_', '-'; at most 32)")
        return value

    def check_keys(self, section: str, known: set[str]) -> None:
        for key in self.parser[section]:
            if key not in known:
                raise self.error(section, key, f"unknown key (known: {', '.join(sorted(known))})")

    def check_unique(self, hosts: tuple[HostConfig, ...], sections: list[str]) -> None:
        seen: dict[tuple[str, int], str] = {}
        for host, section in zip(hosts, sections, strict=True):
            where = (host.address, host.port)
            if where in seen:
                raise self.error(section, "address", f"{host.address}:{host.port} is already "
                                 f"host {seen[where]}")
            seen[where] = host.name

    def integer(self, section: str, key: str, value: str | None, accepted: Range) -> int:
        try:
            return int(accepted.parse(str(value)))
        except ValueError as exc:
            raise self.error(section, key, str(exc)) from None

    def number(self, key: str, accepted: Range, default: float) -> float:
        """A [cluster] key's value, in range; ``default`` when the key is absent."""
        value = self.parser["cluster"].get(key)
        if value is None:
            return default
        try:
            return accepted.parse(value)
        except ValueError as exc:
            raise self.error("cluster", key, str(exc)) from None

    def lease(self, heartbeat: float) -> float:
        lease = self.number("lease", settings.LEASE, settings.LEASE_S)
        problem = settings.lease_problem(lease, heartbeat)
        if problem and "lease" in self.parser["cluster"]:
            raise self.error("cluster", "lease", f"{lease:g} {problem}")
        if problem:
            raise self.error("cluster", "heartbeat", f"{heartbeat:g} is too long for the default "
                             f"lease of {lease:g} s, which {problem}")
        return lease

    def flag(self, key: str, default: bool) -> bool:
        value = self.parser["cluster"].get(key)
        if value is None:
            return default
        if value.strip().lower() in ("yes", "true", "on", "1"):
            return True
        if value.strip().lower() in ("no", "false", "off", "0"):
            return False
        raise self.error("cluster", key, f"{value!r} is neither yes nor no")

    def tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """tls_ca, tls_cert, tls_key: files on this machine (relative to hosts.ini)."""
        found: list[Path | None] = []
        for key in ("tls_ca", "tls_cert", "tls_key"):
            value = self.parser["cluster"].get(key)
            path = (self.path.parent / Path(value).expanduser()) if value else None
            if path is not None and not path.is_file():
                raise self.error("cluster", key, f"{path} is not a file")
            found.append(path)
        if (found[1] is None) != (found[2] is None):
            raise self.error("cluster", "tls_cert", "give tls_cert and tls_key together")
        return found[0], found[1], found[2]

    def memory(self) -> Memory:
        value = self.parser["cluster"].get("redis_maxmemory")
        if value is None:
            return Memory()
        try:
            return settings.parse_memory(value)
        except ValueError as exc:
            raise self.error("cluster", "redis_maxmemory", str(exc)) from None

    def requirements(self) -> tuple[tuple[str, ...], tuple[Path, ...]]:
        """hosts.ini's requirements, one per line: requirements (``scipy>=1.11``, ``name @
        URL``) and local paths (containing a ``/`` or ending in ``.whl``; relative to
        hosts.ini), which must be a wheel or a project directory."""
        wanted: list[str] = []
        packages: list[Path] = []
        for entry in self.parser["cluster"].get("requirements", "").splitlines():
            entry = entry.strip()
            if not entry:
                continue
            if entry.endswith(".whl") or ("/" in entry and "@" not in entry):
                packages.append(self.package(entry))
                continue
            try:
                wanted.append(str(parse(entry)))
            except ValueError as exc:
                hint = "; give one per line" if "," in entry else ""
                raise self.error("cluster", "requirements", f"{exc}{hint}") from None
        return tuple(wanted), tuple(packages)

    def package(self, entry: str) -> Path:
        path = (self.path.parent / Path(entry).expanduser()).resolve()
        if path.is_file() and path.suffix == ".whl":
            return path
        if path.is_dir() and any((path / f).is_file() for f in ("pyproject.toml", "setup.py")):
            return path
        problem = "no such wheel or directory" if not path.exists() else \
            "neither a wheel nor a project directory (with a pyproject.toml or setup.py)"
        raise self.error("cluster", "requirements", f"{entry}: {problem} ({path})")
