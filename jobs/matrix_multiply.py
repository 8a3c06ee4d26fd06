"""Block matrix multiply: C = A @ B, one unit per block of C, checked against numpy's product.

    cluster submit jobs/matrix_multiply.py --param n=1024 --param block=256 -o c.npz
"""

import numpy as np

PARAMS = {"n": 512, "block": 128, "seed": 7}


def matrices(params):
    rng = np.random.default_rng(params["seed"])
    n = params["n"]
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def scatter(params):
    a, b = matrices(params)
    step = params["block"]
    for i in range(0, params["n"], step):
        for j in range(0, params["n"], step):
            yield {"i": i, "j": j, "a": a[i:i + step], "b": b[:, j:j + step]}


def count(params):
    return (-(-params["n"] // params["block"])) ** 2


def compute(unit):
    return {"i": unit["i"], "j": unit["j"], "c": unit["a"] @ unit["b"]}


def gather(results, params):
    n, step = params["n"], params["block"]
    c = np.empty((n, n))
    for r in results:
        c[r["i"]:r["i"] + step, r["j"]:r["j"] + step] = r["c"]
    a, b = matrices(params)
    error = float(np.max(np.abs(c - a @ b)))
    if not np.allclose(c, a @ b):
        raise ArithmeticError(f"block product differs from numpy's by up to {error}")
    return {"c": c, "max_abs_error": error}
