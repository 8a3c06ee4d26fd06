"""Many tiny units folded by reduce: the coordinator holds one number, so what grows is Redis.

cluster submit bench/jobs/count.py --param units=1000000
"""

PARAMS = {"units": 1_000_000}


def scatter(params):
    yield from range(params["units"])


def compute(unit):
    return unit


def reduce(accumulator, result):
    return accumulator + result


def gather(total, params):
    """True when every unit came back exactly once (the sum of 0..units-1)."""
    n = params["units"]
    return total == n * (n - 1) // 2
