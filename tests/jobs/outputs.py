"""Results for the ``--output`` tests. Unit ``i`` computes ``size`` copies of ``i`` (float64)
after sleeping ``sleep`` seconds, and appends ``i`` to the file ``log``: a test counts the calls
(a re-run that writes a kept result computes nothing). Unit ``fail`` raises.

``kind`` picks what gather returns: ``array`` (the units stacked), ``image`` (the same as
uint8), ``text`` (a str, which no array format holds) or ``set`` (which only text holds, and
Redis cannot keep). With ``block`` set, gather first makes that path a directory: writing the
output there then fails, after every check made before the job ran.
"""

import os
import time

import numpy as np

PARAMS = {"units": 3, "size": 4, "sleep": 0.0, "log": "", "fail": -1, "kind": "array",
          "block": ""}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "size": params["size"], "sleep": params["sleep"], "log": params["log"],
               "fail": params["fail"]}


def compute(unit):
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit['i']}\n")
    time.sleep(unit["sleep"])
    if unit["i"] == unit["fail"]:
        raise ValueError(f"unit {unit['i']} fails on purpose")
    return np.full(unit["size"], unit["i"], dtype=np.float64)


def gather(results, params):
    if params["block"]:
        os.makedirs(params["block"], exist_ok=True)
    stacked = np.stack(results)
    if params["kind"] == "image":
        return stacked.astype(np.uint8)
    if params["kind"] == "text":
        return f"{len(results)} units"
    if params["kind"] == "set":
        return {len(results), "units"}
    return stacked
