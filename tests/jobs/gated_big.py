"""Large results (``floats`` float64 values, all equal to the unit's index) from units that
wait for a file (param ``gate``) before they return, and append their index to ``log`` when
they start: a test holds the run open, and knows when units run."""

import os
import time

import numpy as np

PARAMS = {"units": 4, "floats": 1 << 17, "gate": "", "log": ""}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "n": params["floats"], "gate": params["gate"], "log": params["log"]}


def compute(unit):
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit['i']}\n")
    while unit["gate"] and not os.path.exists(unit["gate"]):
        time.sleep(0.01)
    return np.full(unit["n"], float(unit["i"]))


def gather(results, params):
    return [int(r[0]) if r is not None and (r == r[0]).all() else None for r in results]
