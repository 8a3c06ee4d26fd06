"""Units that sleep ``sleep`` seconds each: for --timeout tests.

With ``log`` set, each unit appends ``start <index>`` before it sleeps and ``end <index>`` after,
so a test can tell which units were still running when the job was abandoned.
"""

import time

from cluster import unit_index

PARAMS = {"units": 4, "sleep": 3.0, "log": ""}


def scatter(params):
    for _ in range(params["units"]):
        yield {"sleep": params["sleep"], "log": params["log"]}


def _log(path, what):
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {unit_index()}\n")


def compute(unit):
    _log(unit["log"], "start")
    time.sleep(unit["sleep"])
    _log(unit["log"], "end")
    return unit["sleep"]


def gather(results, params):
    return sum(results)
