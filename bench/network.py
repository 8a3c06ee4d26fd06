"""How many bytes cross the Redis host's network card per MB of large results gathered?

Run from the repository root, as root (it builds test hosts as network namespaces):

    python bench/network.py [--runs 3] [--units 48] [--mb 8]

Setup as in ``bench/reissue.py``: three namespace hosts (``tests/netns.py``), ``cluster up``
over real SSH with ``cores = 1`` per host, Redis on node1; the coordinator runs on this machine
(the root namespace). Each run gathers ``--units`` results of ``--mb`` MB of float64
(``bench/jobs/big.py``) through ``Coordinator.run()`` and reads, around it, the byte counters
of each host's network interface (``/sys/class/net/eth0/statistics``, in its namespace).

Two ways of carrying large results are measured, alternately, on the same hosts:
- ``data path`` (the default, ``data_path = yes``): a result stays in its worker's host's spool
  and goes from there to the coordinator; Redis holds its reference.
- ``through Redis`` (``data_path = no``, by running ``cluster up`` again with it): every result
  is written into Redis on node1 and read out of it by the coordinator.

The coordinator is made to fetch every result over the network, as one on another machine
would (the test hosts share this machine's ``/dev/shm``, which a coordinator here would read
directly). The figure is bytes in + out of node1's interface per MB gathered: about 2
when every result passes through Redis (in from node2 and node3, out to the coordinator;
node1's own worker's results only out), about 1/3 with the data path (only node1's own
worker's results leave it).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reissue  # noqa: E402

from cluster import config as cluster_config  # noqa: E402
from cluster import credentials  # noqa: E402
from cluster.broker import Broker  # noqa: E402
from cluster.coordinator import Coordinator, RunOptions  # noqa: E402
from cluster.jobfile import load_job  # noqa: E402

JOB = HERE / "jobs" / "big.py"


class Site(reissue.Bench):
    data_path = True

    def write_ini(self, hosts: list[reissue.NsHost]) -> None:
        super().write_ini(hosts)
        text = self.ini.read_text().replace("name = reissue", "name = network")
        flag = "yes" if self.data_path else "no"
        self.ini.write_text(text.replace("[cluster]\n", f"[cluster]\ndata_path = {flag}\n", 1))

    def switch(self, data_path: bool) -> None:
        """``cluster up`` again with ``data_path`` on or off (it restarts the agents)."""
        if data_path == self.data_path:
            return
        self.data_path = data_path
        self.write_ini(self.net.hosts)
        self.up()
        assert self.broker is not None
        self.broker.close()
        self.broker = self.connect()
        self.wait_ready()

    def counters(self) -> dict[str, int]:
        """Bytes received + sent so far by each host's interface."""
        out = {}
        for h in self.net.hosts:
            total = 0
            for what in ("rx_bytes", "tx_bytes"):
                r = h.exec("cat", f"/sys/class/net/eth0/statistics/{what}")
                total += int(r.stdout)
            out[h.name] = total
        return out

    def gather(self, units: int, floats: int) -> tuple[float, dict[str, int], float]:
        """One job: (MB gathered, bytes through each host's interface, seconds)."""
        creds = credentials.for_cluster(cluster_config.load(self.ini), create=False)
        job = load_job(str(JOB))
        params = {**job.defaults, "units": units, "n": floats}
        broker = Broker.of(creds)
        try:
            before = self.counters()
            started = time.perf_counter()
            coordinator = Coordinator(broker, job, params, creds.key, RunOptions())
            # the test hosts share this machine's /dev/shm, whose spools a coordinator on the
            # same machine reads directly; one on another machine asks the hosts' data servers
            coordinator.data.find_local = None
            result = coordinator.run()
            seconds = time.perf_counter() - started
            after = self.counters()
        finally:
            broker.close()
        if result.value != units:
            raise RuntimeError(f"the job gathered {result.value!r}, expected {units}")
        return units * floats * 8 / 1e6, {h: after[h] - before[h] for h in after}, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--units", type=int, default=48)
    parser.add_argument("--mb", type=float, default=8.0, help="MB per result (default 8)")
    args = parser.parse_args()
    if os.geteuid() != 0 or reissue.sshd_binary() is None or shutil.which("ip") is None:
        parser.error("needs root, openssh-server (sshd) and iproute2")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    floats = int(args.mb * 1e6 / 8)
    print(f"command: {reissue.command_line()}")
    print(f"3 namespace hosts, cores = 1, Redis on node1, coordinator on this machine; "
          f"{args.units} results of {args.mb:g} MB; {args.runs} runs of each", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cluster-network-"))
    os.environ.setdefault("CLUSTER_JOURNAL", str(work / "journal.jsonl"))
    site = Site(argparse.Namespace(), work)
    rows: dict[str, list[tuple[float, dict[str, int], float]]] = {"data path": [],
                                                                   "through Redis": []}
    try:
        site.open()
        for n in range(args.runs):
            for label, on in (("data path", True), ("through Redis", False)):
                site.switch(on)
                mb, through, seconds = site.gather(args.units, floats)
                rows[label].append((mb, through, seconds))
                print(f"run {n + 1} {label}: {mb:.0f} MB in {seconds:.2f} s; MB through "
                      + ", ".join(f"{h} {b / 1e6:.0f}" for h, b in through.items()),
                      file=sys.stderr, flush=True)
    finally:
        try:
            site.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| results carried | bytes through node1 (Redis) per MB gathered | node2 | node3 "
          "| MB/s |")
    print("|---|---:|---:|---:|---:|")
    for label, runs in rows.items():
        if not runs:
            continue

        def per_mb(host: str, runs: list[tuple[float, dict[str, int], float]] = runs) -> str:
            values = [through[host] / 1e6 / mb for mb, through, _ in runs]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        rate = statistics.median(mb / seconds for mb, _, seconds in runs)
        print(f"| {label} | {per_mb('node1')} | {per_mb('node2')} | {per_mb('node3')} "
              f"| {rate:.0f} |")
    print("\nmedian (min-max) of the runs; bytes = received + sent by the host's interface")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
