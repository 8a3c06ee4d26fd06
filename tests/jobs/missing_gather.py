"""A job file without gather()."""


def scatter(params):
    yield from range(2)


def compute(unit):
    return unit
