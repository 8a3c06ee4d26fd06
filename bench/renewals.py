"""What lease renewals cost Redis as the cluster grows (issue 13): N workers on agents of 64
cores each, every agent renewing every heartbeat (0.5 s; on more than 500 agents, every
agents/1,000 s up to 1 s) through the real scripts, as real agents do. Redis's own account
of the scripts' time (``INFO commandstats``) gives the microseconds per renewal; times the
renewals per second of N workers, the share of one Redis core that renewals take, whether or
not work runs (the network's share of each request is not in it: ``simulate.py --idle-only``
measures Redis's whole CPU).

Three kinds of renewal: the steady one (the agent's workers are those of its last renewal:
not even named), one that lists them (a worker changed), and one that also looks at every
worker for units of jobs that are gone (when a job ended since the agent last looked, and
every 30 s). The share assumes steady renewals, and one that looks every 30 s.

Run from the repository root:  python bench/renewals.py [--workers 1000,10000,64000]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
from typing import Any

from simulate import RedisOnly

from cluster.broker import Broker
from cluster.settings import renewal_interval

PER_AGENT = 64
HEARTBEAT_S = 0.5
LOOK_EVERY_S = 30.0


def script_us(broker: Broker) -> tuple[int, float]:
    """Calls and microseconds of EVALSHA so far (Redis's account)."""
    stats = broker.client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


def per_renewal_us(broker: Broker, agents: dict[str, list[str]], kind: str) -> float:
    """``steady``: the same workers as last time; ``list``: they are listed (a worker
    changed); ``look``: listed, and each looked at for a job that is gone."""
    new_protocol = "same" in inspect.signature(broker.renew).parameters
    calls0, us0 = script_us(broker)
    for aid, wids in agents.items():
        if new_protocol:
            broker.renew(aid, wids, "" if kind == "look" else "0", same=kind == "steady")
        else:  # before issue 13's leases per agent: every renewal listed and looked at all
            broker.renew(aid, wids)
    calls1, us1 = script_us(broker)
    return (us1 - us0) / max(1, calls1 - calls0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1000,10000,64000")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| workers | renewals/s | us per renewal: steady | listing its workers | "
          "looking at jobs | share of a Redis core |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.workers.split(",")):
        with RedisOnly(cores=2) as creds:
            broker = Broker.of(creds.as_role("admin"))
            broker.create_job("J1", {"name": "t", "code": b"", "sig": "", "seed": 0,
                                     "max_attempts": 2, "owner": "o"})
            agents = {f"h{a}/1": [f"h{a}/1/cpu{c}.0" for c in range(PER_AGENT)]
                      for a in range(n // PER_AGENT)}
            new_protocol = "same" in inspect.signature(broker.renew).parameters
            pipe = broker.client.pipeline(transaction=False)
            for aid, wids in agents.items():
                broker.register_agent(aid, {"host": aid.split("/")[0], "cpus": PER_AGENT})
                for wid in wids:  # each computing a unit of a job that is there
                    pipe.hset(broker.keys.worker(wid), mapping={"job": "J1", "agent": aid})
                pipe.execute()
                for wid in wids:
                    if new_protocol:
                        broker.register_worker(wid, aid, {"host": aid.split("/")[0]})
                    else:
                        old: Any = broker.register_worker  # (wid, info)
                        old(wid, {"host": aid.split("/")[0], "agent": aid})
            us = {kind: statistics.median(per_renewal_us(broker, agents, kind)
                                          for _ in range(args.runs))
                  for kind in ("steady", "list", "look")}
            rate = len(agents) / (renewal_interval(HEARTBEAT_S, len(agents)) if new_protocol
                                  else HEARTBEAT_S)  # a large cluster's agents renew less often
            if new_protocol:  # one renewal in LOOK_EVERY_S / HEARTBEAT_S looks at jobs
                mean = us["steady"] + (us["look"] - us["steady"]) * HEARTBEAT_S / LOOK_EVERY_S
            else:
                mean = us["steady"]
            print(f"| {n:,} | {rate:,.0f} | {us['steady']:.1f} | {us['list']:.1f} | "
                  f"{us['look']:.1f} | {rate * mean / 1e4:.2f} % |", flush=True)
            broker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
