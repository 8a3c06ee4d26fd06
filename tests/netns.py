"""Test hosts on this machine: Linux network namespaces on a private bridge, each running its
own sshd with a generated host key and an authorized test key.

They share this machine's filesystem and process table but not its network: each namespace has
its own address on a private test subnet, reached only over the bridge. Their homes (each holds
its install directory) are in a directory of /tmp that every user can reach, as a real host's
/var/lib is: `up` runs Redis and the workers there as users of their own (``accounts``).
Everything made here is removed by ``close()``, also when a test failed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from waiting import wait_for


def host_python() -> str:
    """The hosts' Python: the system's of this version, as a real host has (the workers' user
    reaches it; this one may be under /root), else this one."""
    system = Path("/usr/bin/python{}.{}".format(*sys.version_info[:2]))
    return str(system) if system.exists() else sys.executable


def hosts_ini(client_key: Path, hosts: list[NsHost], *, name: str, state: Path,
              cluster: dict[str, object] | None = None) -> str:
    """A hosts.ini for test hosts: Redis on node1, one core each, this Python's version on
    every host; ``cluster`` adds or overrides [cluster] keys."""
    keys: dict[str, object] = {"name": name, "redis": "node1", "identity_file": client_key,
                               "python": host_python(), "state_dir": state,
                               "connect_timeout": 3, **(cluster or {})}
    lines = ["[cluster]", *(f"{k} = {v}" for k, v in keys.items())]
    for h in hosts:
        lines += ["", f"[host {h.name}]", f"address = {h.address}",
                  f"install_dir = {h.install_dir}", "cores = 1"]
    return "\n".join(lines) + "\n"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def sshd_binary() -> str | None:
    return shutil.which("sshd") or (
        "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@dataclass
class NsHost:
    name: str
    netns: str
    address: str
    home: Path
    host_key: Path
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def install_dir(self) -> Path:
        return self.home / "install"

    def public_host_key(self) -> str:
        """``type base64`` of the sshd's host key, as a known_hosts line wants it."""
        return " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *args, check=check)

    def link(self, up: bool) -> None:
        """Cut the host off the network (or restore it)."""
        self.exec("ip", "link", "set", "eth0", "up" if up else "down")


def free_subnet() -> str:
    """A random 10.231.N subnet that no interface of this machine is on: test networks of
    suites running side by side must not share one (their routes would clash)."""
    used = run("ip", "-o", "-4", "addr", "show").stdout
    free = [n for n in range(1, 251) if f" 10.231.{n}." not in used]
    return f"10.231.{free[secrets.randbelow(len(free))]}"


@dataclass
class NsNetwork:
    workdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(default_factory=free_subnet)
    hosts: list[NsHost] = field(default_factory=list)
    client_key: Path = Path()
    homes: Path = Path()  # the hosts' homes, reachable by every user (pytest's tmp is private)

    @property
    def bridge(self) -> str:
        return f"clbr{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def open(self) -> NsNetwork:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = self.workdir / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key))
        os.chmod(self.workdir, 0o755)
        self.homes = Path(tempfile.mkdtemp(prefix="cluster-hosts-"))
        os.chmod(self.homes, 0o755)
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        Path("/run/sshd").mkdir(exist_ok=True)
        return self

    def add_host(self, start_sshd: bool = True, sftp: bool = True) -> NsHost:
        i = len(self.hosts) + 1
        host = NsHost(name=f"node{i}", netns=f"cl{self.tag}h{i}",
                        address=f"{self.subnet}.{10 + i}", home=self.homes / f"node{i}",
                        host_key=self.homes / f"node{i}" / "ssh_host_ed25519_key")
        self.hosts.append(host)
        host.home.mkdir()
        veth = f"clv{self.tag}{i}"
        run("ip", "netns", "add", host.netns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
            host.netns)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        host.exec("ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        host.exec("ip", "link", "set", "eth0", "up")
        host.exec("ip", "link", "set", "lo", "up")
        if start_sshd:
            self.start_sshd(host, sftp=sftp)
        return host

    def start_sshd(self, host: NsHost, sftp: bool = True) -> None:
        """Start (or restart, after ``kill_host``) the host's sshd, with a new host key; with
        ``sftp=False``, an sshd without the SFTP subsystem, as some hardened hosts have."""
        if host.sshd is not None:
            host.sshd.wait(10)
        for old in (host.host_key, Path(f"{host.host_key}.pub")):
            old.unlink(missing_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.host_key))
        authorized = host.home / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", authorized)
        config = host.home / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {host.address}", "Port 22", f"HostKey {host.host_key}",
            f"PidFile {host.home / 'sshd.pid'}", f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            *(["Subsystem sftp internal-sftp"] if sftp else []),
            "MaxStartups 50", "MaxSessions 50", ""]))
        binary = sshd_binary()
        assert binary is not None
        with (host.home / "sshd.log").open("wb") as log:  # sshd keeps its own copy
            host.sshd = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, binary, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL, stderr=log)
        probe = ["bash", "-c", f"exec 3<>/dev/tcp/{host.address}/22"]
        wait_for(lambda: host.exec(*probe, check=False).returncode == 0, 30,
                 f"sshd on {host.name} to listen (its log: {host.home / 'sshd.log'})")

    def kill_host(self, host: NsHost, sig: int = signal.SIGKILL) -> None:
        """Every process in the host's namespace (sshd, agent, workers, redis) gets ``sig``."""
        for pid in host.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for host in self.hosts:
            for _ in range(20):
                self.kill_host(host)
                if not host.pids():
                    break
                time.sleep(0.1)
            if host.sshd is not None:
                host.sshd.wait(5)
            run("ip", "netns", "del", host.netns, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        if self.homes != Path():
            shutil.rmtree(self.homes, ignore_errors=True)


@dataclass
class NsSite:
    """Test hosts and the working directory that holds their hosts.ini and state."""

    net: NsNetwork
    work: Path

    @property
    def ini(self) -> Path:
        return self.work / "hosts.ini"

    @property
    def state(self) -> Path:
        return self.work / "state"
