"""A job file that does not compile: line 6 is broken."""

PARAMS = {"units": 2}


def scatter(params) -> oops oops:
    yield 1


def compute(unit):
    return unit


def gather(results, params):
    return results
