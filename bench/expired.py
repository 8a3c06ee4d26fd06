"""What one lease check costs Redis as the cluster grows (issue 13): the coordinator's
``EXPIRED`` over N workers that are all consumers of the work stream and all alive, as the
range query it runs every 0.5 s and as the full scan of every consumer it runs every 10 s
(before issue 13 it ran the scan every time). Redis is blocked for as long as a script runs.

Run from the repository root:  python bench/expired.py [--workers 1000,10000,64000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from simulate import RedisOnly

from cluster.broker import Broker
from cluster.keys import GROUP


def check_ms(broker: Broker, full: bool, runs: int) -> float:
    """Median wall time of one EXPIRED call (a round trip on loopback included)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        assert broker.expired_workers(60_000, full=full) == []
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1000,10000,64000")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print("| workers | range query (every 0.5 s) | full scan (every 10 s) |")
    print("|---:|---:|---:|")
    for n in (int(x) for x in args.workers.split(",")):
        with RedisOnly(cores=2) as creds:
            broker = Broker.of(creds.as_role("admin"))
            broker.ensure_group()
            pipe = broker.client.pipeline(transaction=False)
            now = broker.server_time_ms()
            for i in range(n):  # alive, each a consumer of the stream, 64 to an agent
                aid, wid = f"h{i // 64}/1", f"h{i // 64}/1/cpu{i % 64}.0"
                pipe.zadd(broker.keys.workers, {wid: now})
                pipe.zadd(broker.keys.agent_workers(aid), {wid: now})
                pipe.zadd(broker.keys.leases, {aid: now})
                pipe.xgroup_createconsumer(broker.keys.units, GROUP, wid)
                if len(pipe) >= 2000:
                    pipe.execute()
            pipe.execute()
            ranged = check_ms(broker, False, args.runs)
            full = check_ms(broker, True, args.runs)
            print(f"| {n:,} | {ranged:.2f} ms | {full:.2f} ms |", flush=True)
            broker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
