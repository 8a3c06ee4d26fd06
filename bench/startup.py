"""Start-up rows of ``bench.py``: how long each runner takes from nothing until every worker
can take work ("ready"), and to stop again; and a cold 1-unit `cluster submit` from the shell
(a new process: interpreter, imports, local cluster up, one unit, down), against the same for a
1-task ``multiprocessing.Pool`` script. Medians of ``runs``, each runner in turn per round.
"""

from __future__ import annotations

import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers

from cluster.broker import Broker
from cluster.local import LocalCluster

HERE = Path(__file__).resolve().parent
TINY = HERE / "jobs" / "tiny.py"
POOL_SCRIPT = ("import multiprocessing as m\n"
               "if __name__ == '__main__':\n"
               "    with m.Pool({n}) as p: print(sum(p.map(abs, [1])))\n")

Timings = dict[str, dict[str, list[float]]]  # runner -> {"ready": [...], "stop": [...]}


def cluster_ready(n: int) -> tuple[Callable[[], None], float]:
    """A local cluster until all its workers wait for units: each has a connection blocked
    in XREADGROUP (a registered lease comes earlier, before the worker process is up); its
    stop."""
    started = time.perf_counter()
    local = LocalCluster()
    creds = local.__enter__()
    broker = Broker.of(creds.as_role("admin"))
    try:
        while sum(c.get("cmd") == "xreadgroup" for c in broker.client.client_list()) < n:
            time.sleep(0.002)
    finally:
        broker.close()
    return (lambda: local.__exit__(None, None, None)), time.perf_counter() - started


def pool_ready(n: int) -> tuple[Callable[[], None], float]:
    started = time.perf_counter()
    pool = multiprocessing.Pool(n)
    pool.map(abs, range(n))

    def stop() -> None:
        pool.close()
        pool.join()

    return stop, time.perf_counter() - started


def peer_ready(name: str) -> Callable[[int], tuple[Callable[[], None], float]]:
    def ready(n: int) -> tuple[Callable[[], None], float]:
        started = time.perf_counter()
        peer: Any = peers.PEERS[name](n)
        return peer.close, time.perf_counter() - started

    return ready


def cold(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or proc.stdout.strip() != "1":
        raise SystemExit(f"bench: {' '.join(command)} failed: {proc.stderr.strip()[-300:]}")
    return wall


def measure(n: int, runs: int, names: list[str]) -> Timings:
    starters: dict[str, Callable[[int], tuple[Callable[[], None], float]]] = {
        "cluster": cluster_ready, "pool": pool_ready,
        **{name: peer_ready(name) for name in names}}
    timings: Timings = {name: {"ready": [], "stop": []} for name in starters}
    timings["cold submit"] = {"cluster": [], "pool": []}
    for i in range(runs):
        for name, start in starters.items():
            stop, ready = start(n)
            started = time.perf_counter()
            stop()
            timings[name]["ready"].append(ready)
            timings[name]["stop"].append(time.perf_counter() - started)
        timings["cold submit"]["cluster"].append(cold(
            [sys.executable, "-m", "cluster", "submit", str(TINY), "--param", "units=1",
             "--progress", "none", "--print", "json"]))
        timings["cold submit"]["pool"].append(cold(
            [sys.executable, "-c", POOL_SCRIPT.format(n=n)]))
        print(f"  start-up round {i + 1}/{runs}: " + ", ".join(
            f"{name} {t['ready'][-1]:.3f} s" for name, t in timings.items() if "ready" in t),
            flush=True)
    return timings


def report(timings: Timings) -> None:
    def line(values: list[float]) -> str:
        return (f"{statistics.median(values):>7.3f}  [" +
                ", ".join(f"{v:.3f}" for v in values) + "]")

    print("\nstart-up (seconds; median [runs]):")
    print(f"  {'runner':<10} {'ready':>7}  runs{'':<30} {'stop':>7}  runs")
    for name, t in timings.items():
        if "ready" in t:
            print(f"  {name:<10} {line(t['ready']):<44} {line(t['stop'])}")
    cold_runs = timings["cold submit"]
    print(f"  cold 1-unit submit from the shell: cluster {line(cold_runs['cluster'])}; "
          f"a 1-task Pool script {line(cold_runs['pool'])}")
