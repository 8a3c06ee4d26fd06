"""`cluster doctor`: everything that would stop `up`, host by host, changing nothing.

Besides each host's own checks (SSH, SFTP, python, disk, clock, reaching Redis), it compares
the cluster's size, hosts × cores, with the clients Redis accepts (``maxclients``, or for a
Redis that `up` will start, what the Redis host's file limit allows): a worker past the limit
is refused. Near the limit is a note; past it, a problem.
"""

from __future__ import annotations

import shlex
import time
from urllib.parse import urlsplit

from . import redisconf
from .config import HostConfig
from .credentials import redact
from .errors import ClusterError
from .launcher import Launcher
from .redisconf import Limits
from .remote import HostReport, Remote, check_disk, check_python, fan_out
from .ssh import HostError


class Doctor:

    def __init__(self, launcher: Launcher, min_free_mb: int = 1024, max_skew_s: float = 2.0
                 ) -> None:
        self.launcher = launcher
        self.config = launcher.config
        self.min_free_mb = min_free_mb
        self.max_skew_s = max_skew_s
        self.cpu_counts: dict[str, int] = {}  # host -> its workers, as far as known
        self.redis_files: int | None = None  # the file limit Redis would get, where up starts it

    def run(self) -> list[HostReport]:
        redis_up = True
        try:
            self.launcher.broker().close()
        except ClusterError:
            redis_up = False
        reports = fan_out(self.config.hosts, lambda host: self.examine(host, redis_up))
        self.clients(reports, redis_up)
        return reports

    def examine(self, host: HostConfig, redis_up: bool) -> HostReport:
        report = HostReport(host.name)
        remote = self.launcher.remote(host)  # unreachable, auth, host key: raise, reported
        with remote.conn:
            for check in (self.sftp, self.python, self.disk, self.skew, self.cpus):
                try:
                    check(remote, report)
                except HostError as exc:
                    report.problems.append(exc.problem)
            self.redis(remote, report, redis_up)
        report.ok = not report.problems
        report.state = "ok" if report.ok else "problems"
        return report

    def sftp(self, remote: Remote, report: HostReport) -> None:
        remote.sftp().normalize(".")  # `up` ships wheels and secrets over SFTP

    def cpus(self, remote: Remote, report: HostReport) -> None:
        count = remote.host.cpu_count()
        if count is None:
            count = int(remote.sh("getconf _NPROCESSORS_ONLN").strip())
        self.cpu_counts[remote.host.name] = count

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
                self.redis_files = self.file_limit(remote)
            return
        parts = urlsplit(url)
        probe = (f"import socket; socket.create_connection(({parts.hostname!r}, "
                 f"{parts.port or 6379}), 5).close()")
        try:
            remote.sh(f"{shlex.quote(remote.host.python)} -c {shlex.quote(probe)}")
        except HostError:
            report.problems.append(f"cannot reach Redis at {parts.hostname}:{parts.port} "
                                   "from this host")

    @staticmethod
    def file_limit(remote: Remote) -> int | None:
        """The file limit a Redis started by `up` could reach there (None: no limit)."""
        hard, uid = remote.sh("ulimit -Hn; id -u").split()
        return None if hard == "unlimited" or uid == "0" else int(hard)

    def clients(self, reports: list[HostReport], redis_up: bool) -> None:
        """Compare hosts × cores with the clients Redis accepts."""
        workers = sum(self.cpu_counts.get(h.name) or h.cpu_count() or 0 for h in self.config.hosts)
        agents = len(self.config.hosts)
        try:
            limits = self.redis_limits(redis_up, workers, agents)
        except ClusterError as exc:
            self.note(reports, f"cannot read Redis's limits: {exc}")
            return
        if limits is None:
            return
        if workers + agents > limits.maxclients:
            self.note(reports, f"Redis accepts {limits.maxclients} clients, fewer than the "
                      f"{workers} workers and {agents} agents: workers past the limit are "
                      "refused (cluster up raises maxclients; or raise it)", problem=True)
        elif shortfall := limits.shortfall(workers, agents):
            self.note(reports, f"near the limit: {shortfall}")

    def redis_limits(self, redis_up: bool, workers: int, agents: int) -> Limits | None:
        """What the running Redis accepts; for one that `up` will start, what its file limit
        would let it accept; None if unknown."""
        if redis_up:
            broker = self.launcher.broker()
            try:
                return Limits.of(broker)
            finally:
                broker.close()
        if self.redis_files is None:
            return None
        wanted = redisconf.maxclients_for(workers, agents)
        return Limits(min(wanted, self.redis_files - redisconf.RESERVED_FILES), 0, "")

    def note(self, reports: list[HostReport], text: str, problem: bool = False) -> None:
        """On the Redis host's row; for a Redis that `up` does not run, on a row of its own."""
        row = next((r for r in reports if r.host == self.config.redis_host), None)
        if row is None:
            row = HostReport(redact(self.launcher.creds.redis_url), state="ok")
            reports.append(row)
        row.problems.append(text)
        if problem:
            row.ok, row.state = False, "problems"
