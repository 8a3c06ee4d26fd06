"""Units that wait for a file (param ``gate``) before they return, so a test holds a run of the
job open for as long as it needs; each unit appends its index to ``log`` when it starts."""

import os
import time

PARAMS = {"units": 4, "gate": "", "log": "", "tag": ""}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "gate": params["gate"], "log": params["log"]}


def compute(unit):
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit['i']}\n")
    while unit["gate"] and not os.path.exists(unit["gate"]):
        time.sleep(0.01)
    return unit["i"]


def gather(results, params):
    return sum(results)
