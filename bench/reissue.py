"""How long after a host dies are its units reissued, with the default settings?

Run from the repository root, as root (it builds test hosts as network namespaces):

    python bench/reissue.py [--runs 5] [--unit-seconds 2] [--units-per-host 2] [--victim node3]

Setup: three test hosts (``tests/netns.py``: Linux network namespaces on a private bridge, each
with its own sshd), ``cluster up`` over real SSH with ``cores = 1`` per host and Redis on node1.
The wheelhouse is built once and passed to every ``up`` (``--wheelhouse``), so the build the
hosts run stays the same for the whole benchmark.

One run: a job (``bench/jobs/sleep_log.py``) is submitted in this process through
``Coordinator(..., RunOptions()).run()``, the default options; its units sleep
``--unit-seconds`` each and log ``start/end <index> <host> <time>`` to a file. When the victim
host's worker is half-way through a unit, every process in the victim's namespace is SIGKILLed
(``NsNetwork.kill_host``: sshd, agent, worker). Nothing on the victim can report the death, so
the unit comes back only through lease expiry, found by the coordinator. Measured, from the
moment the last SIGKILL was sent:

(1) kill -> requeue: when the victim's unit was queued again in Redis. The time is the id of the
    new stream entry (Redis server time, in ms; Redis runs on this machine, so its clock is this
    machine's clock). As a check, a poller (every 5 ms) notes when the victim's worker lease is
    removed from Redis, which the coordinator's REISSUE does in the same script.
(2) kill -> restart: when the unit started again on a surviving host (the job's log).

Then the victim is restored: a new sshd with a new host key (so its line is removed from the
cluster's known_hosts, and ``cluster up --accept-new-host-keys`` records the new one), and
``cluster up`` starts a new agent there. At the end (also on failure or Ctrl-C): ``cluster
down`` and every namespace is removed.

What determines figure (1), with the defaults (agent heartbeat 0.5 s, lease 5 s, coordinator
maintenance every 0.5 s):

    kill -> requeue = lease - age + lag

- ``lease`` (``RunOptions.lease_s``, 5 s): a worker is lost when its lease, renewed by its
  agent on Redis server time, is older than this (``EXPIRED`` and ``REISSUE`` in broker.py).
- ``age``: how old the victim's last lease renewal was at the kill, 0 to one heartbeat period.
  The agent renews every ``heartbeat`` (0.5 s) plus the time of one agent step, so a kill at a
  random moment finds a renewal 0.25 s old on average. The lease runs from the last renewal,
  not from the death: the death is "backdated" by ``age``.
- ``lag``: from the lease's expiry to the next maintenance pass of the coordinator, which
  requeues. ``maintain()`` runs at most every ``maintain_every_s`` (0.5 s), and only between two
  ``collect()`` calls, which block up to 100 ms for results: passes are 0.5 to ~0.6 s apart, and
  the expiry falls at a random phase of that period.

So (1) lies between about lease - heartbeat (4.5 s) and lease + maintenance period + one collect
block (~5.6 s), around 5.0 s on average. The table shows ``age`` and ``lag`` of every run.
Nothing else waits: the REISSUE script requeues and removes the lease in one step.

Figure (2) adds the time for a surviving worker to take the requeued entry. Workers block on
the stream (XREADGROUP, 500 ms), so an idle one takes it at once (milliseconds, then loading the
job once per worker). A busy one takes it only when its unit ends, after every entry queued
before it: the requeued entry goes to the end of the stream. The defaults (2 units per host of
2 s, kill 1 s into the victim's first unit) leave a survivor idle from about 4 s after the start,
before the earliest possible requeue (1 + 4.5 s), so (2) - (1) is the pickup time; the column
``idle`` says whether a survivor was indeed idle at the requeue.

Where the coordinator speculates (``RunOptions.speculate``, on by default since it exists), an
entry held longer than max(2 s, 4 x the expected batch time) while few units are left and
workers idle gets a second copy. With 2 s units that threshold is 8 s, more than the ~6 s the
victim's entry is held before its lease expires, so the unit comes back through the requeue.
With units shorter than about 1.4 s a speculative copy may start it first (column ``via``), and
when the copy finishes the job before the lease expires, no requeue happens at all: (1) is "-".
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cluster
from cluster import config as cluster_config
from cluster import credentials, wheelhouse
from cluster.agent import AgentSettings
from cluster.broker import Broker
from cluster.coordinator import Coordinator, RunOptions, RunResult
from cluster.jobfile import load_job
from cluster.keys import GROUP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from netns import NsHost, NsNetwork, host_python, sshd_binary  # noqa: E402

JOB = HERE / "jobs" / "sleep_log.py"
OPTIONS = RunOptions()  # the defaults, measured as they are
HEARTBEAT_S = AgentSettings(cpus=(0,)).heartbeat_s
T = TypeVar("T")


# -- small helpers -------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``cluster ARGS`` with this interpreter (and so this ``cluster``)."""
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True,
                          text=True, timeout=timeout)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def free_subnet() -> str:
    """A 10.231.X test subnet that no interface of this machine uses (others may run tests)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        candidate = f"10.231.{secrets.randbelow(250) + 1}"
        if f" {candidate}." not in used:
            return candidate
    raise RuntimeError("no free 10.231.X subnet")


@dataclass(frozen=True)
class Line:
    word: str
    index: int
    host: str
    t: float


def read_log(path: Path) -> list[Line]:
    out = []
    for raw in path.read_text().splitlines():
        parts = raw.split()
        if len(parts) == 4:
            out.append(Line(parts[0], int(parts[1]), parts[2], float(parts[3])))
    return out


def busy_at(lines: list[Line], host: str, t: float) -> bool:
    """Was ``host`` in the middle of a unit at time ``t``?"""
    for s in lines:
        if s.word == "start" and s.host == host and s.t <= t:
            ends = [e.t for e in lines if e.word == "end" and e.index == s.index
                    and e.host == host and e.t >= s.t]
            if not ends or min(ends) > t:
                return True
    return False


@dataclass
class Measurement:
    run: int
    unit: int
    into_unit: float     # victim's unit start -> kill
    kill_span: float     # first SIGKILL sent -> last SIGKILL sent
    age: float           # last lease renewal -> kill
    handled: float | None  # kill -> the poller saw the REISSUE (worker gone from Redis)
    requeue: float | None  # (1) kill -> requeued entry (its stream id); None: nothing moved
    lag: float | None    # lease expiry (last renewal + lease) -> requeue (or REISSUE)
    restart: float       # (2) kill -> start line on a surviving host
    restart_host: str
    via: str             # "requeue", or "copy" when a speculative copy started it first
    idle: bool           # a survivor was idle at the requeue
    stats: dict[str, int]
    job_ok: bool


# -- the benchmark -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.net = NsNetwork(work / "net", subnet=free_subnet())
        self.ini = work / "hosts.ini"
        self.state = work / "state"
        self.house: Path | None = None
        self.broker: Broker | None = None
        self.up_done = False

    # setup / teardown

    def write_ini(self, hosts: list[NsHost]) -> None:
        lines = ["[cluster]", "name = reissue", "redis = node1",
                 f"identity_file = {self.net.client_key}", f"python = {host_python()}",
                 f"state_dir = {self.state}", "connect_timeout = 3", ""]
        for h in hosts:
            lines += [f"[host {h.name}]", f"address = {h.address}",
                      f"install_dir = {h.install_dir}", "cores = 1", ""]
        self.ini.write_text("\n".join(lines))

    def up(self) -> None:
        started = time.monotonic()
        r = cli("up", str(self.ini), "--accept-new-host-keys", "--wheelhouse", str(self.house))
        self.up_done = True
        print(f"$ cluster up {self.ini.name} --accept-new-host-keys --wheelhouse ...  "
              f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
        print(r.stdout.rstrip(), file=sys.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"cluster up failed (exit {r.returncode}): {r.stderr.strip()}")

    def connect(self) -> Broker:
        """The benchmark's own view of Redis (CLIENT LIST, XPENDING): as its admin user."""
        creds = credentials.for_cluster(cluster_config.load(self.ini), create=False)
        return Broker.of(creds.as_role("admin"))

    def open(self) -> None:
        self.net.open()
        hosts = [self.net.add_host() for _ in range(3)]
        self.write_ini(hosts)
        self.house = wheelhouse.prepare().path
        self.up()
        self.broker = self.connect()
        self.wait_ready()

    def close(self) -> None:
        try:
            if self.broker is not None:
                self.broker.close()
            if self.up_done:
                r = cli("down", str(self.ini), timeout=180)
                print(f"$ cluster down {self.ini.name}\n{r.stdout.rstrip()}", file=sys.stderr)
                if r.returncode != 0:
                    print(f"cluster down: exit {r.returncode} {r.stderr.strip()}",
                          file=sys.stderr)
        finally:
            self.net.close()

    def live_by_host(self) -> dict[str, str]:
        """Host -> its worker with a fresh lease."""
        assert self.broker is not None
        live = self.broker.live_workers(int(OPTIONS.lease_s * 1000))
        return {w.split("/", 1)[0]: w for w in sorted(live)}

    def reading(self) -> set[str]:
        """Hosts with a connection to Redis whose last command is XREADGROUP: a worker waiting
        for work. (A consumer appears in XINFO CONSUMERS only once it was served.)"""
        assert self.broker is not None
        by_address = {h.address: h.name for h in self.net.hosts}
        return {by_address.get(c["addr"].rsplit(":", 1)[0], "?")
                for c in self.broker.client.client_list() if c.get("cmd") == "xreadgroup"}

    def wait_ready(self) -> None:
        names = {h.name for h in self.net.hosts}
        wait_for(lambda: set(self.live_by_host()) >= names and self.reading() >= names, 60,
                 "a live worker reading the work stream on every host", every=0.1)

    def restore(self, host: NsHost) -> None:
        """A new sshd (new host key) on the killed host, its key re-recorded, and `up` again."""
        if host.sshd is not None:
            host.sshd.wait(10)  # the killed sshd, reaped
        wait_for(lambda: not host.pids(), 10, f"every process of {host.name} to die")
        host.host_key.unlink(missing_ok=True)  # else ssh-keygen asks whether to overwrite
        Path(f"{host.host_key}.pub").unlink(missing_ok=True)
        self.net.start_sshd(host)
        known = self.state / "known_hosts"
        kept = [line for line in known.read_text().splitlines(keepends=True)
                if line.split(" ", 1)[0] not in (host.address, f"[{host.address}]:22")]
        known.write_text("".join(kept))
        self.up()
        self.wait_ready()

    # one run

    def submit(self, n: int) -> JobRun:
        """Start the job in a thread, through the Python API with the default options."""
        log = self.work / f"units-{n}.log"
        log.write_text("")
        inodes = {str(os.stat(f"/run/netns/{h.netns}").st_ino): h.name for h in self.net.hosts}
        job = load_job(str(JOB))
        units = self.args.units_per_host * len(self.net.hosts)
        params = {**job.defaults, "units": units, "seconds": self.args.unit_seconds,
                  "log": str(log), "hosts": inodes}
        creds = credentials.for_cluster(cluster_config.load(self.ini), create=False)
        broker = Broker.of(creds)
        return JobRun(Coordinator(broker, job, params, creds.key, OPTIONS), broker, log, units)

    def held_entry(self, wid: str) -> str:
        """The id of the one stream entry ``wid`` holds."""
        assert self.broker is not None
        b = self.broker
        pending = b.client.xpending_range(b.keys.units, GROUP, "-", "+", 10, consumername=wid)
        if len(pending) != 1:
            raise RuntimeError(f"{wid} holds {len(pending)} entries, expected 1: {pending}")
        mid = pending[0]["message_id"]
        return mid.decode() if isinstance(mid, bytes) else str(mid)

    def requeued_at(self, job: JobRun, after: str, index: int) -> float | None:
        """Redis server time (s) of the entry that requeued unit ``index``: its stream id. The
        last such entry: a speculative copy, if any, was added before the requeue."""
        assert self.broker is not None
        b = self.broker
        found = None
        for mid, fields in b.client.xrange(b.keys.units, f"({after}", "+") or []:
            if fields and fields.get(b"j") == job.jid.encode() and str(index).encode() in fields:
                text = mid.decode() if isinstance(mid, bytes) else str(mid)
                found = int(text.split("-")[0]) / 1000
        return found

    def kill(self, victim: NsHost, wid: str) -> tuple[float, float, float]:
        """SIGKILL everything on ``victim``: (first kill sent, last kill sent, last lease
        renewal of ``wid``), as times of this machine's clock."""
        assert self.broker is not None
        b = self.broker
        t_first = time.time()
        self.net.kill_host(victim)
        t_kill = time.time()
        time.sleep(0.2)  # a renewal already sent when the agent died is applied by now
        agent = b.client.hget(b.keys.worker(wid), "agent")  # a worker's lease is its agent's
        last = b.client.zscore(b.keys.leases, agent.decode()) if agent else None
        if last is None:
            raise RuntimeError(f"{wid} has no lease in Redis right after the kill")
        return t_first, t_kill, float(last) / 1000

    def wait_reissue(self, job: JobRun, wid: str) -> float | None:
        """When the coordinator's REISSUE of ``wid`` ran: its lease is removed from Redis then
        (also when nothing was left to move). None when the job finished first (a speculative
        copy did the unit): no coordinator is left to look at leases."""
        assert self.broker is not None
        b = self.broker

        def gone() -> float | bool | None:
            job.check()
            if b.client.zscore(b.keys.workers, wid) is None:
                return time.time()
            return True if job.finished() else None

        when = wait_for(gone, OPTIONS.lease_s + 30, f"{wid}'s lease to be found lost",
                        every=0.005)
        return None if when is True else float(when)

    def run_once(self, n: int) -> Measurement:
        assert self.broker is not None
        b, args = self.broker, self.args
        victim = next(h for h in self.net.hosts if h.name == args.victim)
        job = self.submit(n)
        first = job.wait_line(lambda x: x.word == "start" and x.host == victim.name, 60,
                              f"a unit to start on {victim.name}")
        wid = self.live_by_host()[victim.name]
        held = self.held_entry(wid)
        time.sleep(max(0.0, first.t + args.unit_seconds * args.kill_at - time.time()))
        t_first, t_kill, renewed = self.kill(victim, wid)
        handled = self.wait_reissue(job, wid)
        moved = int(b.client.hget(b.keys.stats(job.jid), "reissued") or 0)
        requeued = self.requeued_at(job, held, first.index) if moved else None
        again = job.wait_line(lambda x: x.word == "start" and x.index == first.index
                              and x.host != victim.name, job.units * args.unit_seconds + 60,
                              f"unit {first.index} to start again on a surviving host")
        result = job.result(job.units * args.unit_seconds + 60)
        lines = read_log(job.log)
        survivors = [h.name for h in self.net.hosts if h is not victim]
        at = requeued or handled
        return Measurement(
            run=n, unit=first.index, into_unit=t_first - first.t, kill_span=t_kill - t_first,
            age=t_kill - renewed, handled=None if handled is None else handled - t_kill,
            requeue=None if requeued is None else requeued - t_kill,
            lag=None if at is None else at - (renewed + OPTIONS.lease_s),
            restart=again.t - t_kill, restart_host=again.host,
            via="requeue" if requeued is not None and again.t >= requeued else "copy",
            idle=any(not busy_at(lines, s, at or again.t) for s in survivors),
            stats=dict(result.stats), job_ok=result.value == job.units)


class JobRun:
    """A coordinator running in a thread, and the job's log of unit starts and ends."""

    def __init__(self, coordinator: Coordinator, broker: Broker, log: Path, units: int) -> None:
        self.coordinator = coordinator
        self.broker = broker
        self.log = log
        self.units = units
        self.jid = coordinator.jid
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self.run, name=f"coordinator-{self.jid}",
                                       daemon=True)  # a hung job must not keep us from cleanup
        self.thread.start()

    def run(self) -> None:
        try:
            self.outcome["result"] = self.coordinator.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.outcome["error"] = exc
        finally:
            self.broker.close()

    def check(self) -> None:
        if "error" in self.outcome:
            raise RuntimeError(f"job {self.jid} failed: {self.outcome['error']!r}")

    def wait_line(self, match: Callable[[Line], bool], timeout: float, what: str) -> Line:
        def probe() -> Line | None:
            self.check()
            return next((x for x in read_log(self.log) if match(x)), None)
        return wait_for(probe, timeout, what)

    def finished(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float) -> RunResult:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"job {self.jid} did not finish within {timeout:g} s")
        self.check()
        return self.outcome["result"]  # type: ignore[no-any-return]


# -- report --------------------------------------------------------------------------------------

def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def gap(m: Measurement) -> float | None:
    return None if m.requeue is None else m.restart - m.requeue


# (title, width, left-aligned, cell of one run, summarised over the runs)
COLUMNS: list[tuple[str, int, bool, Callable[[Measurement], str],
                    Callable[[Measurement], float | None] | None]] = [
    ("run", 6, False, lambda m: str(m.run), None),
    ("unit", 4, False, lambda m: str(m.unit), None),
    ("age", 5, False, lambda m: seconds(m.age), lambda m: m.age),
    ("lag", 5, False, lambda m: seconds(m.lag), lambda m: m.lag),
    ("(1) requeue", 11, False, lambda m: seconds(m.requeue), lambda m: m.requeue),
    ("seen", 5, False, lambda m: seconds(m.handled), lambda m: m.handled),
    ("(2) restart", 11, False, lambda m: seconds(m.restart), lambda m: m.restart),
    ("on", 5, True, lambda m: m.restart_host, None),
    ("via", 7, True, lambda m: m.via, None),
    ("(2)-(1)", 7, False, lambda m: seconds(gap(m)), gap),
    ("idle", 4, True, lambda m: "yes" if m.idle else "no", None),
    ("reis/spec/dup/stale", 19, True, lambda m: "/".join(
        str(m.stats.get(k, 0)) for k in ("reissued", "speculated", "duplicates", "stale")),
     None),
    ("job", 3, True, lambda m: "ok" if m.job_ok else "BAD", None),
]


def row(cells: list[str]) -> str:
    return "  ".join(c.ljust(width) if left else c.rjust(width)
                     for c, (_, width, left, _, _) in zip(cells, COLUMNS, strict=True)).rstrip()


def table(ms: list[Measurement]) -> str:
    out = [row([c[0] for c in COLUMNS])]
    out += [row([cell(m) for _, _, _, cell, _ in COLUMNS]) for m in ms]
    summaries: list[tuple[str, Callable[[list[float]], float]]] = [
        ("median", statistics.median), ("min", min), ("max", max)]
    for name, summarise in summaries if ms else []:
        cells = [name]
        for _, _, _, _, value in COLUMNS[1:]:
            values = [v for v in map(value, ms) if v is not None] if value else []
            cells.append(seconds(summarise(values)) if values else "")
        out.append(row(cells))
    return "\n".join(out)


LEGEND = """\
seconds; kill = the moment the last SIGKILL was sent to the victim's namespace
  age          last lease renewal of the victim's worker -> kill (0 to one heartbeat)
  lag          lease expiry (last renewal + lease) -> requeue: the maintenance delay
  (1) requeue  kill -> the victim's unit queued again in Redis (id of the new stream entry)
               = lease - age + lag
  seen         kill -> a 5 ms poller saw the worker's lease removed by REISSUE (check of (1))
  (2) restart  kill -> the unit started again on a surviving host (the job's own log)
  via          requeue, or copy: a speculative copy started it before the requeue
  idle         a surviving worker was idle at the requeue (else (2) includes queueing)
  reis/spec/dup/stale  the job's stats counters at the end"""


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def source_state(package: Path) -> str:
    """The git commit of the package's tree, and whether it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "."],
                               capture_output=True, text=True, timeout=10)
    except OSError:
        return "not a git checkout"
    if head.returncode != 0:
        return "not a git checkout"
    return f"git {head.stdout.strip()}" + (", with uncommitted changes" if dirty.stdout.strip()
                                            else "")


def command_line() -> str:
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " \
        if os.environ.get("PYTHONPATH") else ""
    return f"cd {shlex.quote(os.getcwd())} && {env}{shlex.join([sys.executable, *sys.argv])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--unit-seconds", type=float, default=2.0,
                        help="how long each unit sleeps (default 2)")
    parser.add_argument("--units-per-host", type=int, default=2)
    parser.add_argument("--victim", default="node3", choices=["node2", "node3"],
                        help="the host killed (node1 runs Redis, so it is never the victim)")
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="kill this far into the victim's unit, as a fraction (default 0.5)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or sshd_binary() is None or shutil.which("ip") is None:
        parser.error("needs root, openssh-server (sshd) and iproute2")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, interrupted)
    print(f"command: {command_line()}")
    print(f"cluster {cluster.__version__} from {Path(cluster.__file__).parent} "
          f"({source_state(Path(cluster.__file__).parent)}); defaults: "
          f"heartbeat {HEARTBEAT_S:g} s, lease {OPTIONS.lease_s:g} s, maintenance every "
          f"{OPTIONS.maintain_every_s:g} s")
    print(f"3 namespace hosts, cores = 1, Redis on node1; {args.units_per_host * 3} units of "
          f"{args.unit_seconds:g} s; {args.victim} killed {args.kill_at:g} of the way into a "
          f"unit; {args.runs} runs", flush=True)

    work = Path(tempfile.mkdtemp(prefix="cluster-reissue-"))
    os.environ.setdefault("CLUSTER_JOURNAL", str(work / "journal.jsonl"))  # not in ~/.local
    bench = Bench(args, work)
    results: list[Measurement] = []
    try:
        bench.open()
        victim = next(h for h in bench.net.hosts if h.name == args.victim)
        for n in range(1, args.runs + 1):
            m = bench.run_once(n)
            results.append(m)
            print(f"run {n}: killed {m.into_unit:.3f} s into unit {m.unit} (kill took "
                  f"{1000 * m.kill_span:.0f} ms); (1) kill->requeue {seconds(m.requeue)} s, "
                  f"(2) kill->restart {m.restart:.3f} s on {m.restart_host} via {m.via}",
                  file=sys.stderr, flush=True)
            bench.restore(victim)
    finally:
        try:
            bench.close()
        finally:
            if args.keep:
                print(f"work directory kept: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
        print()
        print(table(results))
        print(LEGEND)
    return 0 if len(results) == args.runs and all(m.job_ok for m in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
