"""`cluster doctor`: everything that would stop `up`, host by host, changing nothing."""

from __future__ import annotations

import shlex
import time
from urllib.parse import urlsplit

from .config import HostConfig
from .errors import ClusterError
from .launcher import Launcher
from .remote import HostReport, Remote, check_disk, check_python, fan_out
from .ssh import HostError


class Doctor:

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
        parts = urlsplit(url)
        probe = (f"import socket; socket.create_connection(({parts.hostname!r}, "
                 f"{parts.port or 6379}), 5).close()")
        try:
            remote.sh(f"{shlex.quote(remote.host.python)} -c {shlex.quote(probe)}")
        except HostError:
            report.problems.append(f"cannot reach Redis at {parts.hostname}:{parts.port} "
                                   "from this host")
