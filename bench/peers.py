"""The peers of ``bench.py``: Dask and Ray, each run like ``multiprocessing.Pool`` (the job
module's scatter, then compute() on every unit through the peer, then gather in scatter order).

Both are optional (``pip install -e '.[bench]'``): a peer that is not installed is skipped with a
message. Each starts once, on every core (one single-threaded worker process per core, as the
cluster's local workers), and is reused for every run of every workload, like the Pool.
"""

from __future__ import annotations

import importlib.util
import os
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runner = Callable[[types.ModuleType, dict[str, Any]], tuple[Any, float]]


def available(name: str) -> bool:
    module = {"dask": "distributed", "ray": "ray"}[name]
    return importlib.util.find_spec(module) is not None


def importable(jobs_parent: Path) -> None:
    """The peers' worker processes import the job modules by name (``jobs.tiny``): put
    bench/ on their path, as it is on ours."""
    paths = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(jobs_parent), paths) if p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker, as the cluster's


class Dask:
    """distributed.LocalCluster: n worker processes of one thread each, no nanny restarts."""

    label = "Dask"

    def __init__(self, n: int) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(n)

    def run(self, module: types.ModuleType, params: dict[str, Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        futures = self.client.map(module.compute, list(module.scatter(params)), pure=False)
        value = module.gather(self.client.gather(futures), params)
        return value, time.perf_counter() - started

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class Ray:
    """ray.init(num_cpus=n) on this machine; compute() as a remote function of one CPU."""

    label = "Ray"

    def __init__(self, n: int) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        up = ray.remote(_identity)
        ray.get([up.remote(i) for i in range(n)])  # every worker up
        self.remotes: dict[str, Any] = {}

    def run(self, module: types.ModuleType, params: dict[str, Any]) -> tuple[Any, float]:
        remote = self.remotes.setdefault(module.__name__, self.ray.remote(module.compute))
        started = time.perf_counter()
        refs = [remote.remote(unit) for unit in module.scatter(params)]
        value = module.gather(self.ray.get(refs), params)
        return value, time.perf_counter() - started

    def close(self) -> None:
        self.ray.shutdown()


def _identity(x: Any) -> Any:
    return x


PEERS: dict[str, type[Dask] | type[Ray]] = {"dask": Dask, "ray": Ray}
