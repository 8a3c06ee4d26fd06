"""SSH connections to hosts (Fabric on Paramiko), safe by default.

Unknown host keys are refused (Fabric's default would silently add them). With
``accept_new=True`` a new key is recorded in the cluster's known_hosts file (trust on first use);
a changed key is always refused. SSH never prompts: keys only, no agent forwarding, no password.
"""

from __future__ import annotations

import threading
from pathlib import Path

import fabric
import paramiko

from .config import ClusterConfig, HostConfig
from .errors import InfraError


class HostError(InfraError):
    """Something went wrong on one host; the message names it."""

    def __init__(self, host: str, problem: str) -> None:
        super().__init__(f"{host}: {problem}")
        self.host = host
        self.problem = problem


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Record a host's first key in the cluster's known_hosts file."""

    lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        with self.lock:
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def connect(config: ClusterConfig, host: HostConfig, accept_new: bool = False
            ) -> fabric.Connection:
    """An open connection to ``host``, or ``HostError`` with a one-line reason."""
    kwargs: dict[str, object] = {"allow_agent": False, "look_for_keys": host.identity_file is None,
                                 "auth_timeout": config.connect_timeout,
                                 "banner_timeout": config.connect_timeout}
    if host.identity_file:
        kwargs["key_filename"] = str(Path(host.identity_file).expanduser())
    conn = fabric.Connection(host.address, user=host.user, port=host.port,
                             connect_timeout=config.connect_timeout, connect_kwargs=kwargs,
                             forward_agent=False)
    conn.connect_timeout = config.connect_timeout  # Fabric truncates it to whole seconds
    client = conn.client
    if config.known_hosts.exists():
        client.load_host_keys(str(config.known_hosts))
    client.set_missing_host_key_policy(
        _TrustOnFirstUse(config.known_hosts) if accept_new else paramiko.RejectPolicy())
    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise HostError(host.name, f"host key of {host.address} has CHANGED since it was "
                        f"recorded in {config.known_hosts}; refusing to connect (if the host "
                        "was really reinstalled, remove its line from that file)") from None
    except paramiko.AuthenticationException as exc:
        raise HostError(host.name, f"SSH authentication as {host.user} failed: {exc}") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostError(host.name, f"unknown host key for {host.address}; refusing to "
                            "connect (run with --accept-new-host-keys to trust it on first "
                            f"use, recorded in {config.known_hosts})") from None
        raise HostError(host.name, f"SSH failed: {exc}") from None
    except (TimeoutError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HostError(host.name, f"unreachable at {host.address}:{host.port}: "
                        f"{reason or type(exc).__name__}") from None
    return conn


def run(conn: fabric.Connection, host: HostConfig, command: str, timeout: float = 120) -> str:
    """Run a command non-interactively; its stdout, or ``HostError`` with its stderr."""
    result = conn.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
    if result.exited != 0:
        err = (result.stderr or result.stdout).strip().splitlines()
        raise HostError(host.name, f"`{command.split()[0]} ...` failed (exit {result.exited})"
                        f": {err[-1] if err else 'no output'}")
    return str(result.stdout)
