"""Units for recovery tests: each logs when it starts, sleeps, and returns a value that depends
only on its index (or on chance, with random=true, to trip the nondeterminism detector).

With ``hold`` set to a unit's index, that unit (every attempt of it) waits until the file
``release`` exists, so that the job cannot finish before the test says so. It gives up (raises)
after ``hold_max`` seconds, so that a test that never releases it fails instead of hanging.
"""

import os
import time
from pathlib import Path

from cluster import unit_index

PARAMS = {"units": 40, "sleep": 0.1, "log": "", "gather_marker": "", "gather_sleep": 0.0,
          "straggler": -1, "random": False, "fail": -1, "hold": -1, "release": "",
          "hold_max": 60.0}


def scatter(params):
    for _ in range(params["units"]):
        yield {k: params[k] for k in ("sleep", "log", "straggler", "random", "fail", "hold",
                                      "release", "hold_max")}


def compute(unit):
    index = unit_index()
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{index} {os.getpid()}\n")
    if index == unit["straggler"]:
        first = Path(f"{unit['log']}.straggler")
        if not first.exists():  # slow the first time only: a copy elsewhere finishes first
            first.touch()
            time.sleep(8)
    if index == unit["hold"]:
        _hold(Path(unit["release"]), unit["hold_max"])
    time.sleep(unit["sleep"])
    if index == unit["fail"]:
        raise ValueError(f"unit {index} fails on purpose")
    if unit["random"]:
        return int.from_bytes(os.urandom(4), "little")
    return index * index


def _hold(release, seconds):
    deadline = time.monotonic() + seconds
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} was not created within {seconds} s")
        time.sleep(0.02)


def gather(results, params):
    if params["gather_marker"]:
        Path(params["gather_marker"]).touch()
        time.sleep(params["gather_sleep"])
    return results
