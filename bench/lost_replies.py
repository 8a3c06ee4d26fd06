"""How long a job takes when replies are lost: 40 units of 512 KB, every client (coordinator,
agent, workers) behind the fault proxy of the test suite, which loses a fraction p of Redis's
replies (Redis ran the command; the client never hears of it) and nothing else.

Reports, per p, the median job time (the summary's) over several seeds, and the same job with
no faults as the baseline, in the same process. Each run must end with the exact result.

python bench/lost_replies.py [--runs 7] [--rates 0,0.01,0.03]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy, Rates  # noqa: E402

from cluster.credentials import Credentials  # noqa: E402
from cluster.local import free_port  # noqa: E402

JOB = ROOT / "tests/jobs/soak_gather.py"
PARAMS = ["--param", "units=40", "--param", "floats=65536", "--param", "sleep=0.02"]


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port, password = free_port(), secrets.token_urlsafe(12)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", password, "--save", "", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return proc, port, password


def one_run(port: int, password: str, workdir: Path, rate: float, seed: int) -> float:
    with FaultProxy(("127.0.0.1", port), seed=seed, rates=Rates(lose=rate)) as proxy:
        creds = workdir / f"creds-{seed}-{rate}.json"
        out = workdir / f"out-{seed}-{rate}.json"
        Credentials(proxy.url, password, b"k" * 32, prefix=f"b{seed}-{rate:g}:").dump(creds)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        agent = subprocess.Popen([sys.executable, "-m", "cluster", "agent", "--credentials",
                                  str(creds), "--cores", "2", "--heartbeat", "0.1"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            done = subprocess.run([sys.executable, "-m", "cluster", "submit", str(JOB),
                                   "--credentials", str(creds), "--progress", "none",
                                   "--timeout", "60", "-o", str(out), *PARAMS], env=env,
                                  capture_output=True,
                                  text=True, timeout=120)
        finally:
            agent.terminate()
            agent.wait(30)
    if done.returncode != 0 or json.loads(out.read_text()) != {"units": 40, "bad": []}:
        raise SystemExit(f"p={rate} seed={seed}: exit {done.returncode}: {done.stderr[-500:]}")
    found = re.search(r"in ([\d.]+) s,", done.stderr)
    assert found, done.stderr
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rates", default="0,0.01,0.03")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, password = start_redis(Path(tmp))
        try:
            times: dict[float, list[float]] = {r: [] for r in rates}
            for seed in range(args.runs):
                for rate in rates:  # interleaved, so that a noisy moment hits every rate
                    times[rate].append(one_run(port, password, Path(tmp), rate, seed))
        finally:
            proc.terminate()
            proc.wait(10)
    base = statistics.median(times[rates[0]])
    print("40 units of 512 KB, 2 workers, every client behind the proxy; job seconds")
    for rate in rates:
        t = times[rate]
        print(f"  lost replies p={rate:<5g} median {statistics.median(t):5.2f} s  "
              f"min {min(t):5.2f}  max {max(t):5.2f}  ratio {statistics.median(t) / base:4.2f}"
              f"  {[round(x, 2) for x in t]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
