"""Pure edges: params, credentials, output files, progress lines."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cluster import output
from cluster.credentials import Credentials, is_loopback, resolve
from cluster.errors import UsageError
from cluster.jobfile import parse_params
from cluster.progress import Lines


def test_params_parse_as_json_where_they_can():
    got = parse_params(["n=3", "x=[1, 2]", "name=pi", "f=0.5", "s=\"3\""], {})
    assert got == {"n": 3, "x": [1, 2], "name": "pi", "f": 0.5, "s": "3"}
    assert parse_params(["n=4"], {"n": 1, "m": 2}) == {"n": 4, "m": 2}


@pytest.mark.parametrize("bad", ["n", "=3", "typo=1"])
def test_bad_params_name_themselves(bad):
    with pytest.raises(UsageError, match=repr(bad).replace("[", r"\[")):
        parse_params([bad], {"n": 1})


def test_credentials_file_is_0600_and_others_are_refused(tmp_path: Path):
    path = tmp_path / "c.json"
    Credentials("redis://h:1/0", "pw", b"k" * 32).dump(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Credentials.load(path).password == "pw"
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        Credentials.load(path)


def test_a_remote_redis_needs_a_password(tmp_path: Path):
    env = {"CLUSTER_KEY_FILE": str(tmp_path / "key")}
    with pytest.raises(UsageError, match="10.1.2.3:6379 is not on loopback"):
        resolve("redis://10.1.2.3:6379", None, env)
    assert resolve("redis://10.1.2.3:6379", None, {**env, "CLUSTER_REDIS_PASSWORD": "x"})
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600  # made on first use
    assert resolve(None, None, env) is None
    assert is_loopback("redis://127.0.0.2:1") and is_loopback("redis://localhost")
    assert not is_loopback("redis://example.org")


def test_flag_beats_environment_beats_file(tmp_path: Path):
    path = tmp_path / "c.json"
    Credentials("redis://127.0.0.1:1/0", "file-pw", b"k" * 32).dump(path)
    env = {"CLUSTER_REDIS_URL": "redis://127.0.0.1:2/0"}
    assert resolve(None, str(path), env).redis_url.endswith(":2/0")
    assert resolve("redis://127.0.0.1:3/0", str(path), env).redis_url.endswith(":3/0")
    assert resolve(None, str(path), {}).password == "file-pw"


def test_output_formats(tmp_path: Path):
    arr = np.arange(6.0).reshape(2, 3)
    assert output.write(str(tmp_path / "a.npy"), arr).suffix == ".npy"
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    output.write(str(tmp_path / "d.npz"), {"x": arr, "n": 3})
    assert np.load(tmp_path / "d.npz")["n"] == 3
    output.write(str(tmp_path / "r.json"), {"pi": np.float64(3.14), "v": arr})
    assert json.loads((tmp_path / "r.json").read_text())["v"][1] == [3.0, 4.0, 5.0]


def test_a_result_that_does_not_fit_the_format_is_kept_as_json(tmp_path: Path):
    written = output.write(str(tmp_path / "r.npy"), {"not": "an array"})
    assert written.name == "r.npy.json"
    assert json.loads(written.read_text()) == {"not": "an array"}


def test_unknown_output_format_is_refused_up_front(tmp_path: Path):
    with pytest.raises(UsageError, match=r"\.txt"):
        output.check_path(str(tmp_path / "r.txt"))


def test_plain_progress_lines_at_an_interval():
    stream = io.StringIO()
    lines = Lines(stream, interval=0.0)
    lines.update(5, 10, 1)
    assert "progress: 5/10 (50%) units" in stream.getvalue()
    assert "1 reissued" in stream.getvalue()
    quiet = Lines(io.StringIO(), interval=3600)
    quiet.update(1, None, 0)
    assert quiet.stream.getvalue() == ""


def test_directories_of_killed_local_clusters_are_swept(tmp_path: Path):
    from cluster.local import PREFIX, sweep_stale

    dead, alive = tmp_path / f"{PREFIX}dead", tmp_path / f"{PREFIX}alive"
    for path, pid in ((dead, 2**22 + 12345), (alive, os.getpid())):
        path.mkdir()
        (path / "owner.pid").write_text(str(pid))
        (path / "redis.conf").write_text("requirepass secret\n")
    sweep_stale(tmp_path)
    assert not dead.exists() and alive.exists()


def test_the_tests_subprocesses_import_this_checkout(tmp_path: Path):
    # conftest puts this checkout first on PYTHONPATH: agents, workers and `python -m cluster`
    # started from any directory run the code under test, not another editable install's
    import subprocess
    import sys

    from conftest import ROOT

    found = subprocess.run([sys.executable, "-c", "import cluster; print(cluster.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert Path(found.strip()).resolve() == ROOT / "cluster" / "__init__.py"
