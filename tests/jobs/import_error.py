"""A job file whose import fails."""

import no_such_module_xyz  # noqa: F401


def scatter(params):
    yield 1


def compute(unit):
    return unit


def gather(results, params):
    return results
