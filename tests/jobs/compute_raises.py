"""compute() raises ValueError on one unit (param ``fail``), after logging the attempt.

Every call appends ``<index>`` to the file named by the ``log`` param, so a test can count the
attempts each unit got.
"""

PARAMS = {"units": 6, "fail": 3, "log": ""}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "fail": params["fail"], "log": params["log"]}


def compute(unit):
    if unit["log"]:
        with open(unit["log"], "a") as f:
            f.write(f"{unit['i']}\n")
    if unit["i"] == unit["fail"]:
        raise ValueError(f"unit {unit['i']} is bad on purpose")
    return unit["i"] * 2


def gather(results, params):
    return sum(results)
