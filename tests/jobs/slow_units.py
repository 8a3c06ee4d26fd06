"""Units that take a moment, and say where they ran: for tests that kill workers mid-unit.

With ``hold`` set to a unit's index, that unit's first attempt holds its worker (for up to
``hold_s`` seconds) after logging its start, so a test can kill that worker surely mid-unit; a
later attempt runs as the others do.
"""

import os
import time
from pathlib import Path

from cluster import unit_index

PARAMS = {"units": 30, "sleep": 0.1, "log": "", "hold": -1, "hold_s": 120.0}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "sleep": params["sleep"], "log": params["log"],
               "hold": params["hold"], "hold_s": params["hold_s"]}


def _first_attempt(log):
    try:
        Path(f"{log}.held").touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


def compute(unit):
    hold = unit["i"] == unit["hold"] and _first_attempt(unit["log"])  # before the start is logged
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit_index()} {os.getpid()}\n")
    if hold:
        time.sleep(unit["hold_s"])
    time.sleep(unit["sleep"])
    return {"i": unit["i"], "square": unit["i"] ** 2}


def gather(results, params):
    return {"indices": [r["i"] for r in results], "squares": [r["square"] for r in results]}
