"""Many tiny units folded with reduce(); scatter notes how far it ran ahead of the results."""

PARAMS = {"units": 100_000}
ahead = {"pulled": 0, "folded": 1, "max": 0}


def scatter(params):
    for i in range(params["units"]):
        ahead["pulled"] += 1
        ahead["max"] = max(ahead["max"], ahead["pulled"] - ahead["folded"])
        yield i


def compute(unit):
    return unit


def reduce(accumulator, result):
    ahead["folded"] += 1
    return accumulator + result


def gather(total, params):
    return {"sum": total, "max_ahead": ahead["max"]}
