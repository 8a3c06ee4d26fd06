"""Mandelbrot set, computed in horizontal tiles and stitched into one image.

    cluster submit jobs/mandelbrot.py -o mandelbrot.png     (or .npy)
"""

import numpy as np

PARAMS = {"width": 800, "height": 600, "tile_rows": 50, "max_iter": 200,
          "x": [-2.2, 1.0], "y": [-1.2, 1.2]}


def scatter(params):
    for top in range(0, params["height"], params["tile_rows"]):
        rows = min(params["tile_rows"], params["height"] - top)
        yield {"top": top, "rows": rows, **params}


def count(params):
    return -(-params["height"] // params["tile_rows"])


def compute(unit):
    ys = np.linspace(*unit["y"], unit["height"])[unit["top"]:unit["top"] + unit["rows"]]
    xs = np.linspace(*unit["x"], unit["width"])
    c = xs[None, :] + 1j * ys[:, None]
    z = np.zeros_like(c)
    escaped = np.full(c.shape, unit["max_iter"], dtype=np.int32)
    for k in range(unit["max_iter"]):
        inside = escaped == unit["max_iter"]
        z[inside] = z[inside] ** 2 + c[inside]
        escaped[inside & (np.abs(z) > 2.0)] = k
    return escaped


def gather(results, params):
    counts = np.vstack(results)
    # bright = escaped late; the set itself is black
    shade = np.where(counts == params["max_iter"], 0, 255 * np.sqrt(counts / params["max_iter"]))
    return shade.astype(np.uint8)
