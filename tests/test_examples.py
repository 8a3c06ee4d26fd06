"""Every example job in jobs/ runs and gives the right answer."""

import numpy as np
from conftest import JOBS, run_cli


def submit(local_cluster, *args):
    return run_cli("submit", *args, "--credentials", str(local_cluster), "--progress", "none")


def test_monte_carlo_pi(local_cluster):
    r = submit(local_cluster, str(JOBS / "monte_carlo_pi.py"), "--param", "units=16")
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - np.pi) < 0.01
    assert "16 units on" in r.stderr


def test_same_seed_same_result_other_seed_other_result(local_cluster):
    job = str(JOBS / "monte_carlo_pi.py")
    small = ("--param", "units=8", "--param", "samples=10000")
    a = submit(local_cluster, job, *small, "--seed", "3").stdout
    b = submit(local_cluster, job, *small, "--seed", "3").stdout
    c = submit(local_cluster, job, *small, "--seed", "4").stdout
    assert a == b != c


def test_matrix_multiply_equals_numpys_product(local_cluster, tmp_path):
    out = tmp_path / "c.npz"
    r = submit(local_cluster, str(JOBS / "matrix_multiply.py"), "--param", "n=256",
               "--param", "block=64", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    np.testing.assert_allclose(np.load(out)["c"], a @ b, rtol=1e-12, atol=1e-12)


def test_mandelbrot_tiles_stitch_into_one_image(local_cluster, tmp_path):
    png = tmp_path / "m.png"
    r = submit(local_cluster, str(JOBS / "mandelbrot.py"), "--param", "width=160",
               "--param", "height=120", "--param", "tile_rows=16", "-o", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npy = tmp_path / "m.npy"
    submit(local_cluster, str(JOBS / "mandelbrot.py"), "--param", "width=160",
           "--param", "height=120", "--param", "tile_rows=16", "-o", str(npy))
    image = np.load(npy)
    assert image.shape == (120, 160) and image.dtype == np.uint8
    assert image[60, 100] == 0  # inside the set (c = -0.2 + 0i): black
    assert image[0, 0] == 0 and image.max() > 0
