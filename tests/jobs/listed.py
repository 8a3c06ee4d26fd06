"""Units in a list, so the total is known from the start: unit ``i`` sleeps ``sleep`` seconds
and returns ``i``; unit ``fail`` raises. With ``hold`` >= 0, units from that index on wait
until the file ``release`` exists (60 s at most)."""

import time
from pathlib import Path

PARAMS = {"units": 10, "sleep": 0.0, "fail": -1, "hold": -1, "release": ""}


def scatter(params):
    keys = ("sleep", "fail", "hold", "release")
    return [{"i": i, **{k: params[k] for k in keys}} for i in range(params["units"])]


def compute(unit):
    if 0 <= unit["hold"] <= unit["i"]:
        deadline = time.monotonic() + 60
        while not Path(unit["release"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    time.sleep(unit["sleep"])
    if unit["i"] == unit["fail"]:
        raise ValueError(f"unit {unit['i']} fails on purpose")
    return unit["i"]


def gather(results, params):
    return sum(r for r in results if r is not None)
