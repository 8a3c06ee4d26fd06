"""Where a process finds Redis and the cluster's key, without secrets on any command line.

Precedence, lowest first: defaults < credentials file (``--credentials``) < environment
(``CLUSTER_REDIS_URL``, ``CLUSTER_REDIS_PASSWORD``, ``CLUSTER_KEY_FILE``) < flags (``--redis``).

The credentials file is JSON (``redis_url``, ``password``, ``key`` in hex, ``prefix``) of mode
0600; a file readable by others is refused. Without one, the key is read from
``CLUSTER_KEY_FILE`` or ``~/.config/cluster/key``, which is created (0600) on first use.
A Redis that is not on loopback must have a password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .acl import Users
from .config import ClusterConfig, load
from .errors import UsageError

DEFAULT_KEY_FILE = Path("~/.config/cluster/key")
DEFAULT_PREFIX = "cluster:"


def redact(url: str) -> str:
    """``host:port`` of a Redis URL, without user or password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"



@dataclass(frozen=True)
class Credentials:
    redis_url: str
    password: str | None
    key: bytes
    prefix: str = "cluster:"
    username: str | None = None  # a Redis ACL user (``acl.py``); None: the default user
    users: dict[str, str] | None = None  # of a Redis that `up` started: role -> password
    tls_ca: str | None = None  # for rediss://: the CA that signed Redis's certificate
    tls_cert: str | None = None  # and a client certificate, if Redis asks for one
    tls_key: str | None = None
    # on hosts, instead of the key: the workers' keys (``signing.WorkerKeys``), which verify
    # jobs and seal messages but cannot sign code
    worker_keys: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps({"redis_url": self.redis_url, "password": self.password,
                           "key": self.key.hex(), "prefix": self.prefix,
                           "username": self.username, "users": self.users,
                           "tls_ca": self.tls_ca, "tls_cert": self.tls_cert,
                           "tls_key": self.tls_key, "worker_keys": self.worker_keys})

    def as_role(self, role: str) -> Credentials:
        """These credentials as Redis user ``role`` (``acl.ROLES``), with no other role's
        password; unchanged for a Redis without our users."""
        if not self.users:
            return self
        return dataclasses.replace(self, username=role, password=self.users[role], users=None)

    @classmethod
    def from_json(cls, text: str, where: str) -> Credentials:
        try:
            data = json.loads(text)
            users = data.get("users")
            return cls(redis_url=data["redis_url"], password=data.get("password"),
                       key=bytes.fromhex(data["key"]), prefix=data.get("prefix", "cluster:"),
                       username=data.get("username"),
                       users=dict(users) if isinstance(users, dict) else None,
                       tls_ca=data.get("tls_ca"), tls_cert=data.get("tls_cert"),
                       tls_key=data.get("tls_key"),
                       worker_keys=_strings(data.get("worker_keys")))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{where}: not a valid credentials file ({exc})") from None

    def dump(self, path: Path) -> None:
        """Write the file with mode 0600 from the start (never briefly readable by others)."""
        write_private(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Credentials:
        return cls.from_json(read_private(path), str(path))


def _strings(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TypeError("worker_keys is not an object of strings")
    return {str(k): v for k, v in value.items()}


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def read_private(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UsageError(f"{path}: credentials must not be readable by others "
                             f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read credentials: {exc.strerror}") from None


def load_key(env: Mapping[str, str]) -> bytes:
    path = Path(env.get("CLUSTER_KEY_FILE") or DEFAULT_KEY_FILE).expanduser()
    if not path.exists():
        write_private(path, secrets.token_hex(32))
    text = read_private(path).strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{path}: a cluster key file holds hex digits") from None


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    host = parts.hostname or "localhost"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(redis_url: str | None, credentials_file: str | None,
            env: Mapping[str, str] | None = None,
            tls: tuple[str | None, str | None, str | None] = (None, None, None)
            ) -> Credentials | None:
    """Credentials from file, environment and flag; None when no Redis was named at all."""
    env = os.environ if env is None else env
    base = Credentials.load(Path(credentials_file)) if credentials_file else None
    url = redis_url or env.get("CLUSTER_REDIS_URL") or (base.redis_url if base else None)
    if url is None:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        shown = re.sub(r"//[^@/]*@", "//", url)  # never repeat a password
        raise UsageError(f"bad Redis URL {shown!r}: expected redis://host:port")
    password = env.get("CLUSTER_REDIS_PASSWORD") or (base.password if base else None)
    password = password or urlsplit(url).password
    if not password and not is_loopback(url):
        raise UsageError(f"Redis at {redact(url)} is not on loopback: a password is required "
                         "(CLUSTER_REDIS_PASSWORD or a credentials file)")
    key = base.key if base else load_key(env)
    prefix = env.get("CLUSTER_PREFIX") or (base.prefix if base else "cluster:")
    username = env.get("CLUSTER_REDIS_USER") or (base.username if base else None)
    username = username or urlsplit(url).username or None
    files = [flag or env.get(f"CLUSTER_TLS_{name.upper()}") or
             (getattr(base, f"tls_{name}") if base else None)
             for flag, name in zip(tls, ("ca", "cert", "key"), strict=True)]
    return Credentials(redis_url=url, password=password, key=key, prefix=prefix,
                       username=username, users=base.users if base else None,
                       tls_ca=files[0], tls_cert=files[1], tls_key=files[2],
                       worker_keys=base.worker_keys if base else None)



def named(hosts: str | None, redis_url: str | None, credentials_file: str | None,
          tls: tuple[str | None, str | None, str | None] = (None, None, None)
          ) -> tuple[ClusterConfig | None, Credentials | None]:
    """The cluster a command names: ``--hosts`` (hosts.ini), else ``--redis`` or
    ``--credentials`` (with ``--tls-ca``, ``--tls-cert``, ``--tls-key``); no credentials when
    it names none."""
    if hosts:
        cfg = load(hosts)
        return cfg, for_cluster(cfg, create=False)
    return None, resolve(redis_url, credentials_file, tls=tls)


def for_cluster(config: ClusterConfig, create: bool,
                env: Mapping[str, str] | None = None) -> Credentials:
    """The credentials of a cluster run by `cluster up`, kept (0600) in its state directory.
    ``create`` makes them on first use: a new key, and a new Redis password when `up` starts
    Redis itself (for an existing Redis: CLUSTER_REDIS_PASSWORD or the URL's)."""
    env = os.environ if env is None else env
    path, url = config.credentials_file, config.redis_address()
    if path.exists():
        return _with_tls(dataclasses.replace(Credentials.load(path), redis_url=url,
                                             prefix=config.prefix), config)
    if not create:
        raise UsageError(f"{path} does not exist: run cluster up {config.path} first")
    if config.redis_host is not None:  # a Redis of ours: its users (acl.py), each a password
        users = Users.new()
        creds = Credentials(url, users.coordinator, secrets.token_bytes(32), config.prefix,
                            username="coordinator", users=users.as_dict())
    else:
        password = env.get("CLUSTER_REDIS_PASSWORD") or urlsplit(url).password
        if not password and not is_loopback(url):
            raise UsageError(f"Redis at {redact(url)} is not on loopback: a password is "
                             "required (CLUSTER_REDIS_PASSWORD)")
        creds = Credentials(url, password, secrets.token_bytes(32), config.prefix)
    creds = _with_tls(creds, config)
    creds.dump(path)
    return creds


def _with_tls(creds: Credentials, config: ClusterConfig) -> Credentials:
    """The TLS files hosts.ini says: the cluster's own CA for a Redis that up starts with TLS,
    or tls_ca, tls_cert and tls_key for a Redis run by someone else."""
    if config.redis_host is not None:
        ca = str(config.tls_dir / "ca.pem") if config.tls else None
        return dataclasses.replace(creds, tls_ca=ca, tls_cert=None, tls_key=None)
    ca, cert, key = (str(p) if p else None for p in config.tls_files)
    return dataclasses.replace(creds, tls_ca=ca, tls_cert=cert, tls_key=key)
