"""Redis memory during a job: results leave Redis as the coordinator gathers them.

Runs on a private local cluster, sampling Redis's ``used_memory`` every 20 ms:
(1) 1,000,000 tiny units folded by ``reduce`` (bench/jobs/count.py), (2) 64 results of 8 MB
(tests/jobs/big_results.py). Prints idle, peak and final memory, and the peak above idle.

python bench/memory.py [--units 1000000]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import redis

from cluster.broker import Broker
from cluster.coordinator import Coordinator, RunOptions
from cluster.jobfile import load_job, parse_params
from cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


class Sampler(threading.Thread):
    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.wait(0.02):
            used = int(self.client.info("memory")["used_memory"])
            self.samples.append((time.monotonic() - start, used))


def measure(local: Any, job_path: Path, params: list[str]) -> dict[str, float]:
    creds = local
    client = redis.Redis.from_url(creds.redis_url, password=creds.password)
    broker = Broker.of(creds)
    job = load_job(str(job_path))
    idle = int(client.info("memory")["used_memory"])
    sampler = Sampler(client)
    sampler.start()
    started = time.monotonic()
    result = Coordinator(broker, job, parse_params(params, job.defaults), creds.key,
                         RunOptions()).run()
    seconds = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    final = int(client.info("memory")["used_memory"])
    broker.close()
    client.close()
    used = [u for _, u in sampler.samples]
    quarter = [max(used[i * len(used) // 4:(i + 1) * len(used) // 4] or [0]) for i in range(4)]
    mb = 1 << 20
    return {"ok": result.value in (True,) or isinstance(result.value, list), "seconds": seconds,
            "idle_mb": idle / mb, "peak_mb": max(used) / mb, "final_mb": final / mb,
            "peak_above_idle_mb": (max(used) - idle) / mb,
            **{f"q{i + 1}_peak_mb": q / mb for i, q in enumerate(quarter)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=1_000_000)
    args = parser.parse_args()
    with LocalCluster() as local:
        time.sleep(1.0)  # let the workers register
        runs = [("1,000,000 tiny units (reduce)" if args.units == 1_000_000
                 else f"{args.units:,} tiny units (reduce)",
                 ROOT / "bench/jobs/count.py", [f"units={args.units}"]),
                ("64 x 8 MB results", ROOT / "tests/jobs/big_results.py", ["units=64"])]
        for label, path, params in runs:
            r = measure(local, path, params)
            print(f"{label}: {r['seconds']:.1f} s, Redis used_memory idle {r['idle_mb']:.1f} MB,"
                  f" peak {r['peak_mb']:.1f} MB (+{r['peak_above_idle_mb']:.1f}), final "
                  f"{r['final_mb']:.1f} MB; peak per quarter of the run: "
                  + ", ".join(f"{r[f'q{i}_peak_mb']:.1f}" for i in range(1, 5)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
