"""How far one Redis carries the control plane (issue 13): thousands of simulated agents and
workers against a real redis-server and a real coordinator (``cluster submit``).

Run from the repository root:  python bench/simulate.py [--workers 100,1000,10000]

Simulated agents and workers speak the real protocol with the real Lua scripts (``workscripts.py``)
and key names (``keys.py``), from a few processes (asyncio, ``redis.asyncio``): each agent
registers like a real one and renews its workers' leases every heartbeat (``RENEW``); each
worker takes an entry (``TAKE``), "computes" each unit by sleeping ``--unit-s``, and records the
batch (``RECORD``, results sealed with the workers' key, small ones packed) exactly as a real
worker does. The coordinator is the real one: ``cluster submit --credentials`` of a job whose
units are ``{"i": i}`` and whose results are the units themselves, checked exact at the end.

Two differences from real workers, both to fit thousands of them on a small machine: a
simulated worker that finds the stream empty waits without a connection of its own, where a
real one blocks in ``XREADGROUP`` (a dispatcher per process wakes, every ``--idle-poll-s``, as
many as the stream has entries not yet delivered), and all the workers of a process share a
pool of connections (``--connections``). The connection column is what the simulation opened,
not what real workers would (one each, plus one per agent).

For each N (simulated workers, ``--per-agent`` per agent), it reports:
- units/s during a job of ``N * --work-s / --unit-s`` units (recorded per second between 20 %
  and 80 % of the job), and the ideal ``N / unit_s``;
- Redis's CPU, as a share of one core: "housekeeping", measured first over ``--idle-s`` with
  no job (agents renewing leases; idle workers parked, as real ones blocked in ``XREADGROUP``
  cost Redis nothing), then "work", the rest of its CPU during the job (the coordinator's
  lease checks come with the job and count there);
- the coordinator's CPU (the ``submit`` process) as a share of one core;
- how long after a simulated host's death (one agent and its workers stop, once 80 % of the
  units are recorded) its units are queued again (the job's ``reissued`` count moves), with the
  lease at ``--lease``;
- the connections Redis had during the job;
- the CPU left on this machine (all cores, busy share): when it nears 100 %, the simulator and
  the coordinator compete for the cores and the figures measure the machine, not Redis.

With matplotlib installed (``pip install -e '.[bench]'``), ``--plot FILE`` draws them against N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import redis.asyncio

from cluster import codec, workscripts
from cluster.agent import JOBS_CHECK_S
from cluster.broker import Broker
from cluster.credentials import Credentials
from cluster.delivery import USAGE_MS, _work
from cluster.entries import PACKED, pack_results
from cluster.keys import GROUP, JOB_ID, Keys
from cluster.local import LocalCluster
from cluster.packing import unpack
from cluster.requirements import Installed
from cluster.settings import renewal_interval
from cluster.signing import Keyring, Sealer
from cluster.version import __version__

HERE = Path(__file__).resolve().parent
JOB = HERE / "jobs" / "count.py"


class RedisOnly(LocalCluster):
    """A private redis-server set up as the local cluster's (users, limits), with no agent."""

    def start_agent(self, creds: Credentials) -> None:
        self.agent = None


# -- the simulated hosts (one process holds many) --------------------------------------------


@dataclass
class Plan:
    creds: str  # the credentials, JSON (admin role: the simulation plays agents and workers)
    agents: list[str]
    sizes: dict[str, int]  # workers of each agent
    unit_s: float
    heartbeat_s: float
    idle_poll_s: float
    connections: int


def host_process(plan: Plan, commands: Any, ready: Any) -> None:
    """Entry point of one simulation process: ``commands`` brings ``kill AGENT`` and ``stop``."""
    asyncio.run(Hosts(plan).run(commands, ready))


class Hosts:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.creds = Credentials.from_json(plan.creds, "simulate")
        self.keys = Keys(self.creds.prefix)
        self.sealer: Sealer = Keyring(self.creds.key).sealer
        self.dead: set[str] = set()
        self.stopping = False
        self.go = asyncio.Event()  # a job is coming: workers take work from now on
        self.idle: list[asyncio.Future[None]] = []  # workers that found the stream empty

    def register(self) -> None:
        """Agents and workers registered as real ones register (one pipeline per agent)."""
        broker = Broker.of(self.creds)
        fingerprint = Keyring(self.creds.key).for_workers().fingerprint()
        installed = Installed.here("sim").fields()
        try:
            for aid in self.plan.agents:
                broker.register_agent(aid, {"host": aid, "pid": 0, "version": __version__,
                                            "cpus": self.plan.sizes[aid], "key": fingerprint,
                                            "started": broker.server_time_ms(), **installed})
                for wid in self.workers(aid):
                    broker.register_worker(wid, aid, {"host": aid, "cpu": wid})
        finally:
            broker.close()

    def failed(self, task: asyncio.Task[None]) -> None:
        """A simulated agent or worker that raised: said at once (the figures would lie)."""
        if not task.cancelled() and task.exception() is not None and not self.stopping:
            print(f"simulate: a simulated host failed: {task.exception()!r} (the simulation "
                  "cannot keep up, or Redis went away): its figures would be wrong",
                  file=sys.stderr)
            self.stopping = True

    def workers(self, aid: str) -> list[str]:
        return [f"{aid}/{aid}/cpu{i}.0" for i in range(self.plan.sizes[aid])]

    async def run(self, commands: Any, ready: Any) -> None:
        self.register()
        url = self.creds.redis_url
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, username=self.creds.username, password=self.creds.password,
            max_connections=self.plan.connections)
        self.client = redis.asyncio.Redis(connection_pool=pool)
        # agents on connections of their own, as real ones: renewals never queue behind the
        # simulated workers' calls (a real agent's renewal waits for no worker)
        agents = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            url, username=self.creds.username, password=self.creds.password,
            max_connections=max(2, self.plan.connections // 4)))
        self.take = self.client.register_script(workscripts.TAKE)
        self.record = self.client.register_script(workscripts.RECORD)
        self.renew = agents.register_script(workscripts.RENEW)
        self.renew_same = agents.register_script(workscripts.RENEW_SAME)
        self.agents_client = agents
        tasks = [asyncio.create_task(self.agent(aid)) for aid in self.plan.agents]
        tasks += [asyncio.create_task(self.worker(aid, wid)) for aid in self.plan.agents
                  for wid in self.workers(aid)]
        tasks.append(asyncio.create_task(self.dispatcher()))
        for task in tasks:
            task.add_done_callback(self.failed)
        ready.set()
        loop = asyncio.get_running_loop()
        while not self.stopping:
            command = await loop.run_in_executor(None, commands.get)
            if command == "stop":
                self.stopping = True
            elif command == "go":
                self.go.set()
            elif command.startswith("kill "):
                self.dead.add(command.split()[1])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()
        await self.agents_client.aclose()

    async def dispatcher(self) -> None:
        """Redis wakes a worker blocked in XREADGROUP when an entry arrives; here, every
        ``idle_poll_s``, as many waiting workers as the stream has entries not yet delivered
        (``XINFO GROUPS``: lag) are woken to take one."""
        while True:
            await asyncio.sleep(self.plan.idle_poll_s)
            if not self.idle:
                continue
            lag = 0
            for group in await self.client.xinfo_groups(self.keys.units):
                fields = {(k.decode() if isinstance(k, bytes) else k): v
                          for k, v in group.items()}
                name = fields.get("name")
                if (name.decode() if isinstance(name, bytes) else name) == GROUP:
                    lag = int(fields.get("lag") or 0)
            wake, self.idle = self.idle[:lag], self.idle[lag:]
            for woken in wake:
                woken.set_result(None)

    async def agent(self, aid: str) -> None:
        wids = self.workers(aid)
        k = self.keys
        keys = [k.agents, k.shutdown, k.agent(aid), k.leases, k.agent_workers(aid), k.orphans,
                k.ended]
        usage = json.dumps({w: {"load": 100.0, "rss": 60 << 20} for w in wids})
        beats = 0
        ended, next_look = "", 0.0  # as a real agent: workers of ended jobs looked for when
        await asyncio.sleep(random.uniform(0, self.plan.heartbeat_s))  # one ended, or 30 s on
        while aid not in self.dead:
            if time.monotonic() >= next_look:
                ended, next_look = "", time.monotonic() + JOBS_CHECK_S
            reply = await self.renew_same(keys=keys, args=[aid, len(wids), ended]) \
                if ended else None
            if reply is None or reply[0] == b"LIST":  # as ``Delivery.renew``
                reply = await self.renew(keys=keys, args=[aid, k.worker_template(),
                                                          k.job(JOB_ID), ended, *wids])
            ended = reply[6].decode()
            interval = renewal_interval(self.plan.heartbeat_s, int(reply[7]))
            beats += 1
            if beats % max(1, int(2 / interval)) == 0:  # as a real agent does
                await self.agents_client.set(k.agent_usage(aid), usage, px=USAGE_MS)
            await asyncio.sleep(interval)

    async def worker(self, aid: str, wid: str) -> None:
        take_keys = [self.keys.units, self.keys.worker(wid)]
        await self.go.wait()  # until then, parked as a real worker blocked in XREADGROUP is
        while aid not in self.dead:
            reply = await self.take(keys=take_keys, args=[GROUP, wid])
            if reply[0] != b"OK":  # wait, as a real worker blocked in XREADGROUP does
                woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self.idle.append(woken)
                await woken
                continue
            flat = reply[2]
            work = _work(reply[1].decode(), dict(zip(flat[::2], flat[1::2], strict=True)), True)
            if work is None:
                continue
            values = unpack(self.sealer, work) if work.packed else {
                i: codec.decode(self.sealer.open(blob, "unit", work.jid, i)) for i, blob in
                work.units}
            started = time.perf_counter()
            await asyncio.sleep(self.plan.unit_s * len(values))
            if aid in self.dead:
                return  # died mid-batch: its entry is reissued through its lapsed lease
            await self.commit(wid, work, values, time.perf_counter() - started)

    async def commit(self, wid: str, work: Any, values: dict[int, Any], seconds: float) -> None:
        """RECORD as ``Delivery.record`` calls it, with results as ``Outbox.seal_once`` seals
        them (small: packed when more than one)."""
        results = [(i, codec.encode(v)) for i, v in values.items()]
        args: list[Any] = [GROUP, work.msgid, wid, f"{seconds:.6f}", work.jid, work.attempt]
        if len(results) > 1:
            packed = pack_results([(i, codec.digest(p), p) for i, p in results])
            args.append(self.sealer.seal(packed, "results", work.jid, wid))
            for i, _ in results:
                args += (i, "ok", PACKED, b"", b"")
        else:
            args.append(b"")
            for i, p in results:
                args += (i, "ok", self.sealer.seal(p, "result", work.jid, i, wid), b"",
                         self.sealer.seal(codec.digest(p), "digest", work.jid, i, wid))
        k = self.keys
        await self.record(keys=[k.units, k.job(work.jid), k.recorded(work.jid),
                                k.results(work.jid), k.stats(work.jid), k.blobs(work.jid),
                                k.worker(wid)], args=args)


# -- the measurement -------------------------------------------------------------------------


@dataclass
class Row:
    workers: int
    units: int
    units_per_s: float
    ideal: float
    housekeeping: float  # share of one core
    work: float
    coordinator: float
    reissue_s: float | None
    connections: int
    machine: float  # busy share of all cores during the job
    exact: bool


def redis_cpu(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def measure(n: int, args: argparse.Namespace) -> Row:
    agents = -(-n // args.per_agent)
    with RedisOnly(cores=min(n, 256)) as creds:
        admin = creds.as_role("admin")
        work_dir = Path(tempfile.mkdtemp(prefix="simulate-"))
        creds_file = work_dir / "credentials.json"
        creds.dump(creds_file)
        client = redis.Redis.from_url(admin.redis_url, username=admin.username,
                                      password=admin.password)
        keys = Keys(creds.prefix)
        ctx = multiprocessing.get_context("spawn")
        names = [f"sim{a:05d}" for a in range(agents)]
        sizes = {name: min(args.per_agent, n - a * args.per_agent)
                 for a, name in enumerate(names)}
        procs, queues = [], []
        for p in range(args.processes):
            mine = names[p::args.processes]
            if not mine:
                continue
            queue, ready = ctx.Queue(), ctx.Event()
            plan = Plan(admin.to_json(), mine, {m: sizes[m] for m in mine}, args.unit_s,
                        args.heartbeat_s, args.idle_poll_s, args.connections)
            proc = ctx.Process(target=host_process, args=(plan, queue, ready), daemon=True)
            proc.start()
            procs.append((proc, ready, mine))
            queues.append((queue, mine))
        try:
            for _proc, ready, _ in procs:
                if not ready.wait(600):
                    raise SystemExit("simulate: a simulation process did not start")
            Broker.of(creds).ensure_group()
            time.sleep(args.heartbeat_s * 2)
            before = redis_cpu(client)
            time.sleep(args.idle_s)
            housekeeping = (redis_cpu(client) - before) / args.idle_s
            if args.idle_only:  # housekeeping alone: no job
                return Row(n, 0, 0.0, 0.0, housekeeping, 0.0, 0.0, None, 0, 0.0, True)
            units = max(n, int(n * args.work_s / args.unit_s))
            row = run_job(n, units, args, client, keys, creds_file, queues, names)
            return Row(n, units, row[0], n / args.unit_s, housekeeping,
                       max(0.0, row[1] - housekeeping), row[2], row[3], row[4], row[5], row[6])
        finally:
            for queue, _ in queues:
                queue.put("stop")
            for proc, _, _ in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            client.close()


def run_job(n: int, units: int, args: argparse.Namespace, client: redis.Redis, keys: Keys,
            creds_file: Path, queues: list[tuple[Any, list[str]]], names: list[str]
            ) -> tuple[float, float, float, float | None, int, float, bool]:
    """The job through the real coordinator: units/s, Redis's CPU share, the coordinator's,
    death to reissue, connections, the machine's busy share, exact."""
    out = Path(tempfile.mkdtemp(prefix="simulate-out-")) / "out.json"
    command = [sys.executable, "-m", "cluster", "submit", str(JOB), "--credentials",
               str(creds_file), "--param", f"units={units}", "--progress", "none",
               "--output", str(out), "--lease", str(args.lease), "--no-speculate"]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before, busy_before = redis_cpu(client), busy()
    started = time.monotonic()
    errors = out.with_name("stderr.txt").open("w")  # a file, not a pipe: it may say a lot
    submit = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    for queue, _ in queues:
        queue.put("go")
    victim = names[len(names) // 2]
    killed_at, reissued_at, connections, reissued_before = None, None, 0, 0
    samples: list[tuple[float, int]] = []  # (time, units recorded)
    while submit.poll() is None:
        time.sleep(0.05)
        now = time.monotonic()
        connections = max(connections, int(client.info("clients")["connected_clients"]))
        samples.append((now, stat(client, keys, "recorded")))
        if killed_at is None and len(names) > 1 and samples[-1][1] >= 0.8 * units:
            for queue, mine in queues:  # a host dies late in the job: the rate is measured
                if victim in mine:      # before, its death to reissue after
                    queue.put(f"kill {victim}")
            killed_at, reissued_before = now, stat(client, keys, "reissued")
            if reissued_before:  # no host was dead: leases lapsed (the simulation lagged)
                print(f"simulate: {reissued_before} units reissued before the kill",
                      file=sys.stderr, flush=True)
        if killed_at is not None and reissued_at is None \
                and stat(client, keys, "reissued") > reissued_before:
            reissued_at = now
    wall = time.monotonic() - started
    errors.close()
    stderr = out.with_name("stderr.txt").read_text()
    if submit.returncode != 0:
        raise SystemExit(f"simulate: the job failed (exit {submit.returncode}): "
                         f"{stderr[-2000:]}")
    redis_share = (redis_cpu(client) - cpu_before) / wall
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    coordinator = (children.ru_utime + children.ru_stime - children_before.ru_utime
                   - children_before.ru_stime) / wall
    machine = (busy() - busy_before) / (wall * (os.cpu_count() or 1))
    exact = json.loads(out.read_text()) is True  # count.py: every unit once
    return (steady_rate(samples, units), redis_share, coordinator,
            None if killed_at is None or reissued_at is None else reissued_at - killed_at,
            connections, machine, exact)


def stat(client: redis.Redis, keys: Keys, name: str) -> int:
    """A counter of the job's stats (the one job being run), 0 before it exists."""
    jids: Any = client.smembers(keys.jobs)
    return sum(int(client.hget(keys.stats(j.decode()), name) or 0) for j in jids)


def steady_rate(samples: list[tuple[float, int]], units: int) -> float:
    """Units recorded per second between 20 % and 80 % of the job: neither the coordinator's
    start nor the tail."""
    low = next(((t, n) for t, n in samples if n >= 0.2 * units), None)
    high = next(((t, n) for t, n in samples if n >= 0.8 * units), None)
    if low is None or high is None or high[0] <= low[0]:
        return 0.0
    return (high[1] - low[1]) / (high[0] - low[0])


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [f"unit {args.unit_s:g} s, {args.per_agent} workers per agent, heartbeat "
             f"{args.heartbeat_s:g} s, lease {args.lease:g} s, {args.processes} simulation "
             f"processes on {os.cpu_count()} cores",
             "| workers | units | units/s | ideal | Redis housekeeping | Redis work | "
             "coordinator | death to reissue | connections | machine busy | exact |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        death = "-" if r.reissue_s is None else f"{r.reissue_s:.1f} s"
        lines.append(f"| {r.workers:,} | {r.units:,} | {r.units_per_s:,.0f} | {r.ideal:,.0f} | "
                     f"{r.housekeeping:.1%} | {r.work:.1%} | {r.coordinator:.1%} | {death} | "
                     f"{r.connections} | {r.machine:.0%} | {'yes' if r.exact else 'NO'} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("simulate: matplotlib is not installed (pip install -e '.[bench]'): no plot",
              file=sys.stderr)
        return
    ns = [r.workers for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ns, [r.units_per_s for r in rows], "o-", label="units/s")
    left.plot(ns, [r.ideal for r in rows], "--", label="ideal (N / unit time)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("simulated workers")
    left.legend()
    for label, values in (("Redis housekeeping", [r.housekeeping for r in rows]),
                          ("Redis work", [r.work for r in rows]),
                          ("coordinator", [r.coordinator for r in rows]),
                          ("machine busy (all cores)", [r.machine for r in rows])):
        right.plot(ns, [100 * v for v in values], "o-", label=label)
    right.set_xscale("log")
    right.set_xlabel("simulated workers")
    right.set_ylabel("% of one core (machine: of all)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"simulate: plot written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="100,1000,10000",
                        help="simulated workers, comma-separated (default 100,1000,10000)")
    parser.add_argument("--per-agent", type=int, default=64)
    parser.add_argument("--unit-s", type=float, default=1.0)
    parser.add_argument("--work-s", type=float, default=10.0,
                        help="the job is this many seconds of work for every worker")
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    parser.add_argument("--idle-poll-s", type=float, default=0.02)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--plot", default="", help="a PNG file to draw the figures in")
    parser.add_argument("--idle-only", action="store_true",
                        help="measure housekeeping alone (agents renewing, no job): a cluster "
                             "larger than the simulation can run a job on")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        print(f"simulate: {n:,} workers...", file=sys.stderr, flush=True)
        rows.append(measure(n, args))
        if args.idle_only:
            print("| workers | agents | renewals/s | Redis housekeeping |\n|---:|---:|---:|---:|")
            for r in rows:
                agents = -(-r.workers // args.per_agent)
                rate = agents / renewal_interval(args.heartbeat_s, agents)
                print(f"| {r.workers:,} | {agents:,} | {rate:,.0f} | "
                      f"{r.housekeeping:.1%} |", flush=True)
        else:
            print(table(rows, args), flush=True)
    if args.plot and not args.idle_only:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
