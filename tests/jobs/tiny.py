"""A small job that works. With ``marker`` set, scatter() creates that file, so a test can tell
whether the job ran at all."""

from pathlib import Path

PARAMS = {"units": 4, "marker": ""}


def scatter(params):
    if params["marker"]:
        Path(params["marker"]).touch()
    yield from range(params["units"])


def compute(unit):
    return unit * 2


def gather(results, params):
    return sum(results)
