"""A job that needs tinydep (tests/tinypkg.py) on the hosts: compute imports it. With
``marker`` set, scatter() creates that file, so a test can tell whether the job ran at all."""

import time
from pathlib import Path

PARAMS = {"units": 8, "marker": "", "sleep": 0.0}
REQUIREMENTS = ["tinydep>=1.0"]


def scatter(params):
    if params["marker"]:
        Path(params["marker"]).touch()
    for unit in range(params["units"]):
        yield {"unit": unit, "sleep": params["sleep"]}


def compute(unit):
    import tinydep  # only the hosts have it

    time.sleep(unit["sleep"])  # long enough that every host takes some
    return unit["unit"] * tinydep.VALUE


def gather(results, params):
    return sum(results)
