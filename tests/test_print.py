"""The result on stdout (``--print``): JSON a program can read when piped, text on a terminal,
nothing with ``none``; a result too large to print is written to a file, never lost; and
nothing but the result ever reaches stdout.

The conversions and the size check are pure and tested alone; the rest runs ``python -m
cluster submit`` against the session's ``local_cluster`` (or a private one) as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLES, run_cli

from cluster import output
from cluster.errors import ExitCode, UsageError

SHAPED = str(SAMPLES / "shaped.py")
OVER_CAP = ("-p", "units=1", "-p", "rows=1000", "-p", "cols=1001")  # 1,001,000 float64: 8 MB


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses Python's NaN and Infinity, which are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def unit(i: int, rows: int = 2, cols: int = 3) -> np.ndarray:
    """What shaped.py's unit ``i`` computes."""
    return (i + 1) * np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)


def submit(local_cluster: Path, *args: str, cwd: Path | None = None,
           ) -> subprocess.CompletedProcess[str]:
    extra = {"cwd": cwd} if cwd else {}
    return run_cli("submit", SHAPED, "--credentials", str(local_cluster), "--progress", "none",
                   *args, **extra)


# -- pure: modes, the JSON form, the cap ----------------------------------------------------


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert output.print_mode("auto", terminal=True) == "text"
    assert output.print_mode("auto", terminal=False) == "json"
    for mode in ("json", "text", "none"):
        assert output.print_mode(mode, terminal=True) == mode
        assert output.print_mode(mode, terminal=False) == mode


def test_json_form_of_arrays_scalars_and_containers() -> None:
    value = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "f": np.float32(0.5),
             "i": np.int64(7), "b": np.bool_(True), "t": (1, "x", None), "n": [np.uint8(3)]}
    assert strict_json(output.to_json(value)) == {
        "a": [[0, 1, 2], [3, 4, 5]], "f": 0.5, "i": 7, "b": True, "t": [1, "x", None], "n": [3]}


def test_nan_and_infinity_are_null_in_arrays_and_scalars() -> None:
    value = {"a": np.array([np.nan, np.inf, -np.inf, 1.5]), "x": float("nan"),
             "y": np.float64("-inf"), "z": [np.float32("inf"), 2.0]}
    assert strict_json(output.to_json(value)) == {
        "a": [None, None, None, 1.5], "x": None, "y": None, "z": [None, 2.0]}


def test_the_cap_counts_every_element() -> None:
    value = {"a": np.zeros((2, 2)), "b": [1, 2.0, "x", None, np.float64(1)]}
    assert output.json_elements(value) == 9
    assert output.print_problem(value, cap=9) is None
    assert output.print_problem(value, cap=8) == "9 elements, more than the 8 printed as JSON"
    assert output.print_problem(np.zeros(output.MAX_PRINT_ELEMENTS)) is None
    assert output.print_problem(np.zeros(output.MAX_PRINT_ELEMENTS + 1)) == (
        "1,000,001 elements, more than the 1,000,000 printed as JSON")


@pytest.mark.parametrize("value, named", [
    (np.array([1j]), "a complex128 array has no JSON form"),
    ({"x": [np.complex64(1)]}, "a complex64 scalar has no JSON form"),
    ({3: 1.0}, "dict key 3 (int) has no JSON form"),
    ({1, 2}, "a set has no JSON form"),
    (np.array(["2024-01-01"], dtype="datetime64[D]"), "a datetime64[D] array has no JSON form"),
])
def test_a_value_with_no_json_form_is_named(value: Any, named: str) -> None:
    problem = output.print_problem(value)
    assert problem is not None and problem.startswith(named), problem
    with pytest.raises(ValueError):
        output.to_json(value)


def test_a_json_file_holds_the_same_form_as_stdout(tmp_path: Path) -> None:
    value = {"a": np.array([np.nan, 1.0]), "i": np.int16(4)}
    written = output.write(str(tmp_path / "r.json"), value)
    assert written == tmp_path / "r.json"
    assert written.read_text() == output.to_json(value) + "\n"
    assert strict_json(written.read_text()) == {"a": [None, 1.0], "i": 4}


def test_what_json_cannot_hold_is_written_as_npy_else_text(tmp_path: Path) -> None:
    complex_array = np.arange(3) * 1j
    npy = output.write(str(tmp_path / "c.json"), complex_array)
    assert npy == tmp_path / "c.json.npy"
    np.testing.assert_array_equal(np.load(npy), complex_array)
    text = output.write(str(tmp_path / "s.json"), {"s": {1, 2}, "z": np.arange(100) * 1j})
    assert text == tmp_path / "s.json.txt"
    assert "{1, 2}" in text.read_text() and "99.j" in text.read_text()  # every element


def test_a_kept_result_is_named_by_its_kind() -> None:
    assert output.keep_name("j-1", np.zeros(3)) == "j-1.npy"
    assert output.keep_name("j-1", [1.0, 2.0]) == "j-1.npy"
    assert output.keep_name("j-1", {"a": np.zeros(3), "b": 2.0}) == "j-1.npz"
    assert output.keep_name("j-1", {"a": np.zeros(3), "b": "text"}) == "j-1.json"
    assert output.keep_name("j-1", "text") == "j-1.json"


def test_stdout_goes_to_stderr_inside_the_guard(capfd: pytest.CaptureFixture[str]) -> None:
    with output.stdout_to_stderr():
        print("python")
        os.write(1, b"fd\n")
        subprocess.run(["echo", "child"], check=True)
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert err.split() == ["python", "fd", "child"]


def test_png_without_pypng_is_refused_before_the_job_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "png", None)  # import png raises ImportError
    with pytest.raises(UsageError, match="pypng"):
        output.check_path(str(tmp_path / "m.png"))


# -- end to end -----------------------------------------------------------------------------


def test_a_piped_array_result_is_json_equal_to_the_value(local_cluster: Path) -> None:
    r = submit(local_cluster)
    assert r.returncode == 0, r.stderr
    assert strict_json(r.stdout) == np.stack([unit(i) for i in range(3)]).tolist()
    assert "3 units on" in r.stderr


def test_a_dict_of_arrays_result_is_json_equal_to_the_value(local_cluster: Path) -> None:
    r = submit(local_cluster, "-p", "shape=dict", "--print", "json")
    assert r.returncode == 0, r.stderr
    assert strict_json(r.stdout) == {"sum": (unit(0) + unit(1) + unit(2)).tolist(),
                                     "max": [5.0, 10.0, 15.0], "units": 3}


def test_nan_and_infinity_print_as_null(local_cluster: Path) -> None:
    r = submit(local_cluster, "-p", "shape=special")
    assert r.returncode == 0, r.stderr
    assert strict_json(r.stdout) == [None, None, None, 1.5]


def test_print_none_leaves_stdout_empty(local_cluster: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.npy"
    r = submit(local_cluster, "--print", "none", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    np.testing.assert_array_equal(np.load(out), np.stack([unit(i) for i in range(3)]))


def test_print_text_gives_the_rendering(local_cluster: Path) -> None:
    r = submit(local_cluster, "--print", "text")
    assert r.returncode == 0, r.stderr
    expected = np.stack([unit(i) for i in range(3)])
    assert r.stdout == output.render(expected) + "\n"
    assert r.stdout.startswith("array of shape (3, 2, 3), dtype float64:\n")


def test_over_the_cap_with_output_the_file_is_written_and_stdout_empty(
        local_cluster: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.npy"
    r = submit(local_cluster, *OVER_CAP, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    np.testing.assert_array_equal(np.load(out), unit(0, 1000, 1001)[None])
    assert (f"result not printed: 1,001,000 elements, more than the 1,000,000 printed as "
            f"JSON; it is in {out}") in r.stderr.splitlines()


def test_over_the_cap_without_output_fails_and_keeps_the_result(
        local_cluster: Path, tmp_path: Path) -> None:
    r = submit(local_cluster, *OVER_CAP, cwd=tmp_path)
    assert r.returncode == ExitCode.RESULT_ELSEWHERE, r.stderr
    assert r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("cluster: error:")]
    assert len(errors) == 1, r.stderr
    kept = list(tmp_path.glob("shaped-*.npy"))
    assert len(kept) == 1, list(tmp_path.iterdir())
    assert errors[0] == (
        "cluster: error: result not printed: 1,001,000 elements, more than the 1,000,000 "
        f"printed as JSON; it was written to {kept[0].name} instead (use --output FILE, or "
        "--print none)")
    np.testing.assert_array_equal(np.load(kept[0]), unit(0, 1000, 1001)[None])
    assert "1 units on" in r.stderr  # the summary still comes


def test_nothing_but_the_result_reaches_stdout(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """On a private local cluster, whose agent and workers this submit starts: the job's prints
    at import, in scatter and gather, from Python and to fd 1, go to stderr; those of compute
    to its captured output (`cluster logs`)."""
    for name in ("CLUSTER_REDIS_URL", "CLUSTER_REDIS_PASSWORD", "CLUSTER_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    env = {"CLUSTER_LOG_DIR": str(tmp_path)}
    r = run_cli("submit", str(SAMPLES / "chatty.py"), "--cores", "1", "--progress", "none",
                env=env)
    assert r.returncode == 0, r.stderr
    assert strict_json(r.stdout) == {"squares": [0, 1, 4]}
    for said in ("imported", "scatter", "gather", "fd 1 in the coordinator"):
        assert f"chatty: {said}" in r.stderr, r.stderr
    jid = r.stderr.split("cluster logs ")[1].split()[0]
    logs = run_cli("logs", jid, env=env).stdout
    for said in ("compute 2", "sys.stdout", "fd 1 in a worker"):
        assert f"chatty: {said}" in logs and f"chatty: {said}" not in r.stderr, logs

