"""scatter() or gather() raises, as the ``where`` param says:

- ``scatter``: scatter() raises before it returns anything;
- ``scatter-lazy``: scatter() returns a generator that raises after two units;
- ``gather``: gather() raises.
"""

PARAMS = {"where": "gather"}


def scatter(params):
    if params["where"] == "scatter":
        raise ValueError("scatter broke on purpose")
    if params["where"] == "scatter-lazy":
        return _lazy_units()
    return list(range(4))


def _lazy_units():
    yield 0
    yield 1
    raise ValueError("lazy scatter broke on purpose")


def compute(unit):
    return unit


def gather(results, params):
    if params["where"] == "gather":
        raise ValueError("gather broke on purpose")
    return sum(results)
