"""One host over SSH, as `up`, `down` and `doctor` use it: per-host reports, fan-out over all
hosts, the host's install directory, and the checks that must pass before `up`."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fabric
import paramiko

from .config import HostConfig
from .errors import ClusterError
from .ssh import HostError, run


@dataclass
class HostReport:
    host: str
    ok: bool = True
    state: str = ""
    cpus: str = ""
    pid: int | None = None
    version: str = ""
    problems: list[str] = field(default_factory=list)


def fan_out(hosts: tuple[HostConfig, ...], step: Callable[[HostConfig], HostReport]
            ) -> list[HostReport]:
    """``step`` on every host at once; an error becomes that host's failed report."""

    def guarded(host: HostConfig) -> HostReport:
        try:
            return step(host)
        except HostError as exc:
            return HostReport(host.name, ok=False, state="failed", problems=[exc.problem])
        except ClusterError as exc:
            return HostReport(host.name, ok=False, state="failed", problems=[str(exc)])
        except Exception as exc:  # noqa: BLE001 - one host's surprise must not stop the others
            return HostReport(host.name, ok=False, state="failed",
                              problems=[f"{type(exc).__name__}: {exc}"])

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(guarded, hosts))


class Remote:
    """One host's install directory, over an open connection."""

    def __init__(self, conn: fabric.Connection, host: HostConfig, cluster: str) -> None:
        self.conn = conn
        self.host = host
        home, _, uid = run(conn, host, 'printf "%s\\n%s" "$HOME" "$(id -u)"').rpartition("\n")
        self.root = uid.strip() == "0"
        # as root, not under /root: the workers' and Redis's own users must reach it
        where = host.install_dir or (f"/var/lib/cluster/{cluster}" if self.root
                                     else f"~/.cluster/{cluster}")
        self.dir = where.replace("~", home.strip(), 1) if where.startswith("~") else where

    def sh(self, command: str, timeout: float = 300) -> str:
        return run(self.conn, self.host, command, timeout)

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def q(self, name: str) -> str:
        return shlex.quote(self.path(name))

    def read(self, name: str) -> str:
        return self.sh(f"cat {self.q(name)} 2>/dev/null || true").strip()

    def read_all(self, *names: str) -> list[str]:
        """Several small files in one command ("" for a missing one): each SSH command costs
        a session on the host."""
        mark = "--cluster-file--"
        out = self.sh("; ".join(f"cat {self.q(n)} 2>/dev/null; echo; echo {mark}" for n in names))
        return [part.strip() for part in out.split(mark)[:len(names)]]

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session; ``HostError`` when the host's sshd offers none."""
        try:
            sftp: paramiko.SFTPClient = self.conn.sftp()  # Fabric is untyped
            return sftp
        except (paramiko.SSHException, EOFError) as exc:
            raise HostError(self.host.name, "no SFTP: its sshd has no sftp subsystem (add "
                            "`Subsystem sftp internal-sftp` to its sshd_config): "
                            f"{exc or type(exc).__name__}") from None

    def hashes(self, name: str) -> dict[str, str]:
        """The SHA-256 of every wheel in directory ``name``, by file name."""
        script = ("import hashlib, pathlib, sys\n"
                  "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.whl')):\n"
                  "    print(hashlib.sha256(p.read_bytes()).hexdigest(), p.name)")
        out = self.sh(f"{shlex.quote(self.host.python)} -c {shlex.quote(script)} {self.q(name)}")
        return {file: digest for digest, file in (line.split(" ", 1)
                                                  for line in out.splitlines() if line)}

    def write_private(self, name: str, text: str) -> None:
        """Create the file 0600 before anything is written into it."""
        sftp = self.sftp()
        with sftp.open(self.path(name), "w") as f:
            f.chmod(0o600)
            f.write(text)

    def pid_alive(self, name: str) -> int | None:
        """The pid in pidfile ``name`` if that process is still ours: a stale pidfile may name
        a pid that some other program has been given since."""
        pid, _, args = self.sh(f"pid=$(cat {self.q(name)} 2>/dev/null); echo \"$pid\"; "
                               "case $pid in ''|*[!0-9]*) ;; *) ps -o args= -p $pid;; esac; "
                               "true").strip().partition("\n")
        mine = "redis-server" if "redis" in name else "cluster agent"
        return int(pid) if pid.isdigit() and mine in args else None

    def stop_pid(self, name: str, grace: float = 15.0) -> bool:
        """TERM the process in pidfile ``name``, KILL it after ``grace``; True if it was up."""
        pid = self.pid_alive(name)
        if pid is None:
            return False
        self.sh(f"kill {pid}; for i in $(seq {int(grace * 10)}); do kill -0 {pid} 2>/dev/null"
                f" || exit 0; sleep 0.1; done; kill -9 {pid} 2>/dev/null || true")
        return True


def check_disk(remote: Remote, min_free_mb: int = 1024) -> None:
    """Enough free space where the install directory is (or will be)."""
    probe = (f"d={shlex.quote(remote.dir)}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); "
             "done; df -Pk \"$d\" | tail -1 | awk '{print $4}'")
    free_mb = int(remote.sh(probe).strip() or 0) // 1024
    if free_mb < min_free_mb:
        raise HostError(remote.host.name, f"only {free_mb} MB free under {remote.dir} "
                        f"(need {min_free_mb} MB)")


def check_python(remote: Remote) -> str:
    """The host's python must be >= 3.10 and, for the shipped compiled wheels, ours."""

    python = shlex.quote(remote.host.python)
    try:
        found = remote.sh(f"{python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    except HostError:
        raise HostError(remote.host.name, f"no python at {remote.host.python!r} "
                        "(set python = ... in hosts.ini)") from None
    version = found.strip()
    mine = "{}.{}".format(*sys.version_info[:2])
    if tuple(map(int, version.split("."))) < (3, 10):
        raise HostError(remote.host.name, f"python {version} at {remote.host.python}; "
                        "cluster needs 3.10 or newer")
    if version != mine:
        raise HostError(remote.host.name, f"python {version} at {remote.host.python}, but the "
                        f"wheelhouse is built for {mine}: point python = ... at a {mine}")
    return version
