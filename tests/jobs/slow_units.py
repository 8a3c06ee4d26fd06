"""Units that take a moment, and say where they ran: for tests that kill workers mid-unit."""

import os
import time

from cluster import unit_index

PARAMS = {"units": 30, "sleep": 0.1, "log": ""}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "sleep": params["sleep"], "log": params["log"]}


def compute(unit):
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit_index()} {os.getpid()}\n")
    time.sleep(unit["sleep"])
    return {"i": unit["i"], "square": unit["i"] ** 2}


def gather(results, params):
    return {"indices": [r["i"] for r in results], "squares": [r["square"] for r in results]}
