"""Throughput of ``cluster`` against ``multiprocessing.Pool`` on this machine, all cores.

Run from the repository root:  python bench/bench.py [--runs 5]

Three workloads, job files in bench/jobs/ (each also importable, so the Pool runs the very same
scatter/compute/gather):

(a) tiny  - 20,000 units whose compute() returns its input: units/s. Per-unit overhead.
(b) cpu   - 200 CPU-bound numpy units of ~20 ms each (the work size is calibrated at start so one
            unit takes ~20 ms serially here): parallel efficiency
            = serial time / (cores x wall time), the serial time being compute() run on every
            unit, one after the other, in this process, once per round (the median over the
            rounds is used for every run, so one noisy serial timing skews no run).
(c) big   - 64 units each returning a float64 array of 1,000,000 elements: MB/s gathered
            (64 x 8 MB / wall time).

The cluster side is one private LocalCluster (its own redis-server, one agent, one pinned worker
per core) reused for every run of every workload; each run is one ``Coordinator.run()``, timed
from outside (job registration, scatter, gather and cleanup included). The Pool side is one
``multiprocessing.Pool(cores)`` reused likewise; each run is ``gather(pool.map(compute,
list(scatter(params))), params)``. Both get one untimed warm-up run per workload, then --runs
rounds that alternate cluster and Pool; the table shows the median and every run. The jobs use
numpy's element-wise functions only, never BLAS, so BLAS thread settings play no part.

With the Python API (issue 11), (a) and (b) also run through ``cluster.Executor.map`` (one
Executor on the same local cluster for every run: one job) next to ``ProcessPoolExecutor.map``
(one pool for every run), the same call for both (chunksize 100 for (a), 1 for (b)); the
report adds the ratio executor/ppe. ``--no-executor`` leaves them out.

The machine may be shared: each run also records "other load", the CPU time that processes not
started by this benchmark used during the run, as a share of cores x wall time. A run with much
other load is slow for reasons outside cluster; the table shows the median per runner. (CPU time
is counted in 10 ms ticks, so the share is coarse for runs much shorter than a second.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import psutil

from cluster import workdir
from cluster.broker import Broker
from cluster.coordinator import Coordinator, RunOptions
from cluster.credentials import Credentials, write_private
from cluster.executor import Executor as ClusterExecutor
from cluster.jobfile import Job, load_job
from cluster.local import LocalCluster

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
import startup  # noqa: E402

from jobs import big, cpu, tiny  # noqa: E402

UNIT_TARGET_S = 0.020
# Executor.map's chunksize per workload, the same for cluster.Executor and ProcessPoolExecutor:
# tiny calls batched as map's own knob batches them, ~20 ms calls one by one
MAP_CHUNKS = {"a": 100, "b": 1}
NOISY = 0.05  # median other load above which a verdict is flagged as disturbed


@dataclass
class Workload:
    """One workload: its job module, parameters, and how a wall time becomes its figure."""

    key: str  # for --only
    label: str
    metric: str
    module: types.ModuleType
    params: dict[str, Any]
    expect: Any  # what gather() must return
    figure: Callable[[float, float], float]  # (wall seconds, serial seconds) -> figure
    serial: bool = False  # measure compute() run serially each round
    target: float = 0.0
    walls: dict[str, list[float]] = field(default_factory=dict)  # runner -> seconds per run
    other: dict[str, list[float]] = field(default_factory=dict)
    serials: list[float] = field(default_factory=list)  # seconds, one per round

    def figures(self, runner: str) -> list[float]:
        """The metric of each run of `runner`."""
        serial = statistics.median(self.serials) if self.serials else 0.0
        return [self.figure(wall, serial) for wall in self.walls[runner]]

    @property
    def path(self) -> str:
        return str(self.module.__file__)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def calibrate_iters(size: int) -> int:
    """``iters`` of bench/jobs/cpu.py for which one unit takes ~UNIT_TARGET_S here, serially
    (median of 5 timings, refined three times)."""
    iters = 200
    for _ in range(3):
        seconds = statistics.median(
            timed(cpu.compute, {"size": size, "iters": iters}) for _ in range(5)
        )
        iters = max(1, round(iters * UNIT_TARGET_S / seconds))
    return iters


def timed(fn: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def workloads(n: int, iters: int) -> list[Workload]:
    """The three workloads; n is the number of cores, iters the calibrated work of one cpu unit."""
    units_a, units_b, units_c, elements = 20_000, 200, 64, 1_000_000
    params_b = {"units": units_b, "size": 4096, "iters": iters}
    mb_c = units_c * elements * 8 / 1e6
    return [
        Workload(
            key="a",
            label=f"(a) {units_a:,} tiny units",
            metric="units/s",
            module=tiny,
            params={"units": units_a},
            expect=units_a,
            figure=lambda wall, _: units_a / wall,
            target=20_000,
        ),
        Workload(
            key="b",
            label=f"(b) {units_b} x ~20 ms numpy units ({iters} iters)",
            metric="efficiency",
            module=cpu,
            params=params_b,
            expect=cpu.gather([cpu.compute(params_b)] * units_b, params_b),
            figure=lambda wall, serial: serial / (n * wall),
            serial=True,
            target=0.90,
        ),
        Workload(
            key="c",
            label=f"(c) {units_c} x 8 MB float64 results",
            metric="MB/s",
            module=big,
            params={"units": units_c, "n": elements},
            expect=units_c,
            figure=lambda wall, _: mb_c / wall,
            target=300,
        ),
    ]


class OtherLoad:
    """CPU time used by processes outside this benchmark's tree, between start() and share()."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.me = psutil.Process()
        self.busy = self.ours = self.wall = 0.0

    def start(self) -> None:
        self.busy, self.ours, self.wall = busy_cpu(), self.our_cpu(), time.perf_counter()

    def share(self) -> float:
        """Other processes' CPU seconds / (cores x wall seconds) since start()."""
        other = (busy_cpu() - self.busy) - (self.our_cpu() - self.ours)
        return max(0.0, other / (self.n * (time.perf_counter() - self.wall)))

    def our_cpu(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total


def busy_cpu() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


# -- the two runners -------------------------------------------------------------------------


def run_cluster(creds: Credentials, job: Job, params: dict[str, Any]) -> tuple[Any, float]:
    """One job through the local cluster: (gathered value, wall seconds)."""
    broker = Broker.of(creds)
    try:
        started = time.perf_counter()
        result = Coordinator(broker, job, params, creds.key, RunOptions()).run()
        return result.value, time.perf_counter() - started
    finally:
        broker.close()


def run_pool(pool: Pool, module: types.ModuleType, params: dict[str, Any]) -> tuple[Any, float]:
    """The same job through multiprocessing.Pool: (gathered value, wall seconds)."""
    started = time.perf_counter()
    results = pool.map(module.compute, list(module.scatter(params)))
    value = module.gather(results, params)
    return value, time.perf_counter() - started


def run_map(executor: Executor, module: types.ModuleType, params: dict[str, Any],
            chunksize: int) -> tuple[Any, float]:
    """The job's units through an Executor's map (cluster.Executor or ProcessPoolExecutor),
    as code written for concurrent.futures would run them: (gathered value, wall seconds)."""
    started = time.perf_counter()
    results = list(executor.map(module.compute, module.scatter(params), chunksize=chunksize))
    value = module.gather(results, params)
    return value, time.perf_counter() - started


def run_serial(module: types.ModuleType, params: dict[str, Any]) -> float:
    """compute() on every unit, one after the other, in this process: seconds."""
    started = time.perf_counter()
    for unit in module.scatter(params):
        module.compute(unit)
    return time.perf_counter() - started


def local_credentials(creds: Credentials) -> Path:
    """The local cluster's credentials file (cluster.Executor takes a file)."""
    path = Path(tempfile.mkdtemp(prefix="bench-")) / "credentials.json"
    write_private(path, creds.to_json())
    return path


def wait_for_workers(creds: Credentials, n: int, timeout: float = 30.0) -> None:
    """Until all n workers of the local cluster hold a lease, so no run starts short-handed."""
    broker = Broker.of(creds)
    try:
        deadline = time.monotonic() + timeout
        while len(broker.live_workers(5000)) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: fewer than {n} cluster workers after {timeout:g} s")
            time.sleep(0.05)
    finally:
        broker.close()


def check(w: Workload, runner: str, value: Any) -> None:
    if value != w.expect:
        raise SystemExit(f"bench: {w.label} via {runner} gathered {value!r}, expected {w.expect!r}")


def measure(w: Workload, creds: Credentials, pool: Pool, runs: int, warmup: int, n: int,
            others: dict[str, Any], executors: dict[str, Executor]) -> None:
    """Warm-up, then `runs` rounds of cluster, Pool, the peers (and serial): timings into w."""
    job = load_job(w.path)  # shipped with its directory, as cluster submit does
    job = dataclasses.replace(job, archive=workdir.pack(Path(w.path)))
    params = {**job.defaults, **w.params}
    runners: dict[str, Callable[[], tuple[Any, float]]] = {
        "cluster": lambda: run_cluster(creds, job, params),
        "pool": lambda: run_pool(pool, w.module, params),
        **{name: (lambda peer=peer: peer.run(w.module, params))  # type: ignore[misc]
           for name, peer in others.items()},
        **({name: (lambda ex=ex: run_map(ex, w.module, params, MAP_CHUNKS[w.key]))  # type: ignore[misc]
            for name, ex in executors.items()} if w.key in MAP_CHUNKS else {}),
    }
    for _ in range(warmup):
        for name, runner in runners.items():
            check(w, name, runner()[0])
    meter = OtherLoad(n)
    for i in range(runs):
        for name, runner in runners.items():
            meter.start()
            value, wall = runner()
            w.walls.setdefault(name, []).append(wall)
            w.other.setdefault(name, []).append(meter.share())
            check(w, name, value)
        if w.serial:
            w.serials.append(run_serial(w.module, params))
        extra = f", serial {w.serials[-1]:.2f} s" if w.serial else ""
        each = ", ".join(f"{name} {w.walls[name][-1]:.3f} s (other load {w.other[name][-1]:.0%})"
                         for name in runners)
        print(f"  {w.label} run {i + 1}/{runs}: {each}{extra}", flush=True)


# -- report ------------------------------------------------------------------------------------


def fmt(metric: str, x: float) -> str:
    return f"{x:.3f}" if metric == "efficiency" else f"{x:,.0f}"


def report(ws: list[Workload], n: int, command: str) -> None:
    print(f"\ncommand (in {os.getcwd()}): {command}")
    print(f"cores: {n} (cluster: LocalCluster, 1 pinned worker per core; Pool({n}))\n")
    print(f"{'workload':<44} {'metric':<10} {'runner':<8} {'median':>9} {'other':>6}  runs")
    for w in ws:
        runs_of = {r: w.figures(r) for r in w.walls}
        medians = {r: statistics.median(v) for r, v in runs_of.items()}
        for runner, values in runs_of.items():
            runs = ", ".join(fmt(w.metric, v) for v in values)
            label = w.label if runner == "cluster" else ""
            other = statistics.median(w.other[runner])
            print(
                f"{label:<44} {w.metric:<10} {runner:<8} {fmt(w.metric, medians[runner]):>9}"
                f" {other:>6.0%}  [{runs}]"
            )
        for runner in runs_of:
            if runner not in ("cluster", "executor"):
                print(f"{'':<44} {'':<10} {'ratio':<8} "
                      f"{medians['cluster'] / medians[runner]:>9.2f}         cluster/{runner}")
        if "executor" in medians and "ppe" in medians:
            print(f"{'':<44} {'':<10} {'ratio':<8} "
                  f"{medians['executor'] / medians['ppe']:>9.2f}         executor/ppe")
        if w.serials:
            serials = ", ".join(f"{x:.2f}" for x in w.serials)
            median = statistics.median(w.serials)
            print(f"{'':<44} {'serial s':<19} {median:>9.2f}         [{serials}]")
    print("\ntargets (cluster median, 2-core machine):")
    for w in ws:
        got = statistics.median(w.figures("cluster"))
        verdict = "met" if got >= w.target else "MISSED"
        other = statistics.median(w.other["cluster"])
        if other > NOISY:
            verdict += f" (but other processes took {other:.0%} of the CPUs: rerun when quiet)"
        print(
            f"  {w.label:<44} {w.metric} {fmt(w.metric, got)} >= {fmt(w.metric, w.target)}: "
            f"{verdict}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per workload (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per workload first")
    parser.add_argument("--peers", default="dask,ray",
                        help="peers to run beside cluster and Pool: dask, ray (comma-separated; "
                             "'none': neither); one not installed is skipped with a message")
    parser.add_argument("--no-executor", dest="executor", action="store_false",
                        help="skip the map runners of (a) and (b): cluster.Executor.map on the "
                             "same local cluster, and ProcessPoolExecutor.map")
    parser.add_argument("--startup-runs", type=int, default=5,
                        help="start-ups and cold 1-unit submits timed per runner (0: none)")
    parser.add_argument(
        "--only",
        choices=["a", "b", "c"],
        action="append",
        help="run only this workload (repeatable)",
    )
    args = parser.parse_args()
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    n = cores()
    iters = calibrate_iters(4096)
    chosen = [w for w in workloads(n, iters) if not args.only or w.key in args.only]
    print(
        f"{n} cores; cpu unit calibrated to {iters} iters (~{UNIT_TARGET_S * 1e3:.0f} ms)",
        flush=True,
    )
    names = [p for p in args.peers.split(",") if p and p != "none"]
    for name in names:
        if name not in peers.PEERS:
            raise SystemExit(f"bench: --peers {name}: dask or ray")
        if not peers.available(name):
            print(f"bench: {name} is not installed (pip install -e '.[bench]'): skipped")
    names = [p for p in names if peers.available(p)]
    peers.importable(HERE)
    ups = startup.measure(n, args.startup_runs, names) if args.startup_runs else None
    others: dict[str, Any] = {}
    try:
        with LocalCluster() as creds, multiprocessing.Pool(n) as pool, \
                contextlib.ExitStack() as stack:
            wait_for_workers(creds, n)
            for name in names:
                others[name] = peers.PEERS[name](n)
            executors: dict[str, Executor] = {}
            if args.executor:  # each one session for every run: one job, one process pool
                executors["executor"] = stack.enter_context(ClusterExecutor(
                    credentials=str(local_credentials(creds)), directory=HERE))
                executors["ppe"] = stack.enter_context(ProcessPoolExecutor(n))
            for w in chosen:
                measure(w, creds, pool, args.runs, args.warmup, n, others, executors)
    finally:
        for peer in others.values():
            peer.close()
    report(chosen, n, command)
    if ups is not None:
        startup.report(ups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
