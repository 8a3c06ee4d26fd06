"""``--output``: written to a temporary file and renamed into place, so that a reader never sees
half a file and a run that fails leaves the previous file alone; checked before the job runs;
placeholders; a result that does not fit the format is kept beside and said; a write that fails
keeps the result, and running the command again writes it without computing it again.

The file writes are tested alone; the rest runs ``python -m cluster submit`` as a user would,
against the session's ``local_cluster``, an own agent (to look into Redis) or a private local
cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from conftest import SAMPLES, AgentProcess, run_cli

from cluster import output
from cluster.broker import Broker
from cluster.destination import Destination
from cluster.errors import ExitCode, UsageError

JOB = str(SAMPLES / "outputs.py")


def expected(units: int = 3, size: int = 4) -> np.ndarray:
    """What outputs.py's ``array`` result is."""
    return np.stack([np.full(size, i, dtype=np.float64) for i in range(units)])


def calls(log: Path) -> int:
    """How many times compute ran."""
    return len(log.read_text().split()) if log.exists() else 0


def error_line(result: subprocess.CompletedProcess[str], code: ExitCode) -> str:
    """Assert the exit code; the one ``cluster: error:`` line."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stderr}"
    lines = [x for x in result.stderr.splitlines() if x.startswith("cluster: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write left behind."""
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or "-probe-" in p.name]


def submit(creds: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    extra = {"cwd": cwd} if cwd else {}
    return run_cli("submit", JOB, "--credentials", str(creds), "--progress", "none",
                   "--print", "none", *args, env=env, **extra)


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (a skip where this process may not mount one)."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory no file can be created in, even by root (a read-only mount)."""
    if os.geteuid() != 0:
        where = tmp_path / "ro"
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    with tmpfs(tmp_path / "ro", "ro,size=64k") as where:
        yield where


# -- the write alone --------------------------------------------------------------------------


def test_a_write_replaces_the_file_by_a_rename(tmp_path: Path) -> None:
    target = tmp_path / "r.npy"
    target.write_bytes(b"previous")
    target.chmod(0o640)
    before = target.stat().st_ino
    assert output.write(str(target), np.arange(3.0)) == target
    assert target.stat().st_ino != before  # a new file, not the old one rewritten
    assert target.stat().st_mode & 0o777 == 0o640  # with the permissions of the previous one
    np.testing.assert_array_equal(np.load(target), np.arange(3.0))
    assert leftovers(tmp_path) == []


def test_a_reader_never_sees_part_of_the_file(tmp_path: Path) -> None:
    target = tmp_path / "big.npy"
    versions = [np.full(1_000_000, v, dtype=np.float64) for v in (0.0, 1.0)]  # 8 MB each
    output.write(str(target), versions[0])
    whole = {target.read_bytes()}
    output.write(str(target), versions[1])
    whole.add(target.read_bytes())
    seen: list[int] = []
    partial: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            (seen if data in whole else partial).append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(8):
            output.write(str(target), versions[n % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and not partial, f"{len(partial)} reads saw part of a file: {partial[:5]}"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("previous\n")
    before = target.stat().st_ino

    def half(file: BinaryIO) -> None:
        file.write(b"half of a new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        output.write_atomically(target, half)
    assert target.stat().st_ino == before and target.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


def test_a_kept_result_is_written_by_a_rename_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "j-1.npy").write_bytes(b"previous")
    before = (tmp_path / "j-1.npy").stat().st_ino
    kept = output.keep("j-1", np.arange(2.0))
    assert kept == Path("j-1.npy") and kept.stat().st_ino != before
    assert leftovers(tmp_path) == []


def test_misfit_says_what_the_format_holds_and_what_the_result_is() -> None:
    assert output.misfit("r.npy", np.zeros(3)) is None
    assert output.misfit("r.png", np.zeros((2, 3))) == (
        "a .png file holds a 2-D or 3-D uint8 array (an image), and the result is a float64 "
        "array of shape (2, 3)")
    assert output.misfit("r.npy", "text") == (
        "a .npy file holds an array (or numbers), and the result is a str")
    assert output.misfit("r.json", {1, 2}) == "a set has no JSON form"


# -- the path: placeholders, checks before the run --------------------------------------------


def test_placeholders_are_expanded_once_in_local_time() -> None:
    now = time.mktime((2024, 3, 9, 7, 5, 4, 0, 0, -1))  # local time
    dest = Destination("out/{job}-{date}T{time}-{id}{{x}}.npy", "pi", now=now)
    assert dest.path("a1b2c3d4e5f6") == "out/pi-2024-03-09T070504-a1b2c3d4e5f6{x}.npy"
    assert dest.path("ffffffffffff") == "out/pi-2024-03-09T070504-ffffffffffff{x}.npy"


@pytest.mark.parametrize("template, named", [
    ("r-{host}.npy", "unknown placeholder {host}"),
    ("r-{}.npy", "unknown placeholder {}"),
    ("r-{date:%Y}.npy", "unknown placeholder {date:%Y}"),
    ("r-{id!r}.npy", "unknown placeholder {id!r}"),
    ("r-{date.npy", "expected '}' before end of string"),
    ("r-}.npy", "Single '}' encountered"),
])
def test_a_bad_placeholder_is_refused(template: str, named: str) -> None:
    with pytest.raises(UsageError, match=re.escape(named)) as caught:
        Destination(template, "pi")
    assert str(caught.value).startswith(f"--output {template}: ")
    assert "{job}, {date}, {time}, {id}" in str(caught.value) or "brace" in str(caught.value)


def test_id_in_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="use it in the file's name, not in a directory"):
        Destination(str(tmp_path / "{id}" / "r.npy"), "pi").check()


def test_the_check_refuses_a_missing_directory_or_a_directory_in_the_way(tmp_path: Path
                                                                          ) -> None:
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        output.check_path(str(tmp_path / "d.npy"))
    with pytest.raises(UsageError, match="does not exist"):
        output.check_path(str(tmp_path / "missing" / "r.npy"))
    output.check_path(str(tmp_path / "r.npy"))
    assert leftovers(tmp_path) == []


# -- end to end: before, during and after a run -----------------------------------------------


def test_a_run_replaces_the_output_by_a_rename(local_cluster: Path, tmp_path: Path) -> None:
    target = tmp_path / "r.npy"
    np.save(target, np.zeros(1))
    before = target.stat().st_ino
    r = submit(local_cluster, "-o", str(target), "-p", f"log={tmp_path / 'log'}")
    assert r.returncode == 0, r.stderr
    assert target.stat().st_ino != before
    np.testing.assert_array_equal(np.load(target), expected())
    assert f"result written to {target}" in r.stderr.splitlines()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how, code", [(("-p", "fail=1"), ExitCode.JOB_FAILED),
                                       (("-p", "sleep=2", "--timeout", "1"), ExitCode.TIMEOUT)])
def test_a_failed_or_timed_out_run_leaves_the_previous_file(
        local_cluster: Path, tmp_path: Path, how: tuple[str, ...], code: ExitCode) -> None:
    target = tmp_path / "r.npy"
    np.save(target, np.zeros(1))
    before = (target.stat().st_ino, target.read_bytes())
    r = submit(local_cluster, "-o", str(target), "-p", f"log={tmp_path / 'log'}", *how)
    error_line(r, code)
    assert (target.stat().st_ino, target.read_bytes()) == before
    assert leftovers(tmp_path) == []


def test_png_without_pypng_is_refused_before_the_job_runs(local_cluster: Path, tmp_path: Path
                                                          ) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "png.py").write_text("raise ImportError('no pypng here')\n")
    log = tmp_path / "log"
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ["PYTHONPATH"]])}
    r = submit(local_cluster, "-o", str(tmp_path / "m.png"), "-p", f"log={log}", env=env)
    assert "pypng" in error_line(r, ExitCode.USAGE)
    assert calls(log) == 0, "the job ran before --output was checked"


def test_an_unwritable_directory_is_refused_before_the_job_runs(
        local_cluster: Path, tmp_path: Path, unwritable: Path) -> None:
    log = tmp_path / "log"
    r = submit(local_cluster, "-o", str(unwritable / "r.npy"), "-p", f"log={log}")
    line = error_line(r, ExitCode.USAGE)
    assert f"--output {unwritable / 'r.npy'}: cannot write in {unwritable}" in line
    assert calls(log) == 0, "the job ran before --output was checked"


def test_an_unknown_placeholder_is_refused_before_the_job_runs(local_cluster: Path,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "log"
    r = submit(local_cluster, "-o", str(tmp_path / "r-{host}.npy"), "-p", f"log={log}")
    assert "unknown placeholder {host}" in error_line(r, ExitCode.USAGE)
    assert calls(log) == 0


def test_placeholders_name_the_file(local_cluster: Path, tmp_path: Path) -> None:
    days = {time.strftime("%Y-%m-%d")}
    r = submit(local_cluster, "-o", str(tmp_path / "{job}-{date}-{time}-{id}.npy"),
               "-p", f"log={tmp_path / 'log'}")
    days.add(time.strftime("%Y-%m-%d"))
    assert r.returncode == 0, r.stderr
    [written] = [p.name for p in tmp_path.glob("*.npy")]
    match = re.fullmatch(r"outputs-(\d{4}-\d\d-\d\d)-(\d{6})-([0-9a-f]{12})\.npy", written)
    assert match and match[1] in days, written
    assert f"result written to {tmp_path / written}" in r.stderr.splitlines()


def test_a_result_that_does_not_fit_is_written_as_json_and_fails(local_cluster: Path,
                                                                  tmp_path: Path) -> None:
    target = tmp_path / "r.png"
    target.write_bytes(b"an older image")
    before = target.stat().st_ino
    r = submit(local_cluster, "-o", str(target), "-p", f"log={tmp_path / 'log'}")
    line = error_line(r, ExitCode.RESULT_ELSEWHERE)
    assert line == (
        f"cluster: error: --output {target}: the result does not fit (a .png file holds a 2-D "
        "or 3-D uint8 array (an image), and the result is a float64 array of shape (3, 4)); it "
        f"was written to {target}.json instead, and {target} was left as it was")
    assert output.to_json(expected()) + "\n" == Path(f"{target}.json").read_text()
    assert target.stat().st_ino == before and target.read_bytes() == b"an older image"


# -- a write that fails -----------------------------------------------------------------------


@contextmanager
def blocked(tmp_path: Path, how: str) -> Iterator[tuple[Path, tuple[str, ...], Path | None]]:
    """The output path, params that make its write fail after every check, and a file whose
    removal lets the write succeed (None: remove the directory gather made)."""
    if how == "directory":
        target = tmp_path / "r.npy"
        yield target, ("-p", f"block={target}"), None
        return
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        target = disk / "r.npy"
        np.save(target, np.zeros(1))
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space"):
            while True:  # until the disk is full
                f.write(b"\0" * 65536)
        yield target, (), filler


@pytest.mark.parametrize("how", ["directory", "full disk"])
def test_a_failed_write_keeps_the_result_and_a_rerun_writes_it_without_computing(
        agent: AgentProcess, creds_file: Path, broker: Broker, tmp_path: Path, how: str) -> None:
    log = tmp_path / "log"
    with blocked(tmp_path, how) as (target, params, filler):
        previous = target.read_bytes() if target.is_file() else None
        before = target.stat().st_ino if previous else None
        command = ("-o", str(target), "-p", f"log={log}", "-p", "size=200000", *params)
        r = submit(creds_file, *command)
        line = error_line(r, ExitCode.OUTPUT_FAILED)
        reason = "Is a directory" if how == "directory" else "No space left on device"
        assert line.startswith(f"cluster: error: could not write {target}: {reason}; the result "
                               "is kept in Redis with job "), line
        jid = re.findall(r"--resume ([0-9a-f]{12})", line)[0]
        assert broker.job_exists(jid) and broker.client.exists(broker.keys.final(jid))
        if previous is not None:  # the full disk: the previous file is as it was
            assert target.stat().st_ino == before and target.read_bytes() == previous
        assert leftovers(target.parent) == []
        assert calls(log) == 3
        if filler is None:
            target.rmdir()
        else:
            filler.unlink()
        again = submit(creds_file, *command)
        assert again.returncode == 0, again.stderr
        np.testing.assert_array_equal(np.load(target), expected(size=200000))
    assert calls(log) == 3, "the re-run computed again"
    assert (f"the result of job {jid} was kept in Redis by an earlier run: nothing computed "
            "again") in again.stderr.splitlines()
    assert not broker.job_exists(jid) and not broker.client.exists(broker.keys.final(jid))


def test_a_result_redis_cannot_keep_is_saved_beside_when_the_write_fails(
        agent: AgentProcess, creds_file: Path, broker: Broker, tmp_path: Path) -> None:
    target = tmp_path / "r.json.txt"  # where a set goes, for want of a JSON form
    r = submit(creds_file, "-o", str(tmp_path / "r.json"), "-p", f"block={target}",
               "-p", "kind=set", "-p", f"log={tmp_path / 'log'}", cwd=tmp_path)
    line = error_line(r, ExitCode.OUTPUT_FAILED)
    [saved] = tmp_path.glob("outputs-*.json.txt")
    jid = saved.name.split("-")[1].split(".")[0]
    assert line == (
        f"cluster: error: could not write {target}: Is a directory; the result was saved to "
        f"{saved.name} instead (Redis cannot keep it, as the result cannot encode a set: a value "
        "of type set is not numbers, str, lists, dicts or numpy arrays; job "
        f"{jid} is kept, but a re-run computes it again)")
    assert saved.read_text() in ("{3, 'units'}\n", "{'units', 3}\n")
    assert broker.job_exists(jid) and not broker.client.exists(broker.keys.final(jid))


def test_a_private_cluster_saves_the_result_beside_when_the_write_fails(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CLUSTER_REDIS_URL", "CLUSTER_REDIS_PASSWORD", "CLUSTER_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    target = tmp_path / "r.npy"
    r = run_cli("submit", JOB, "--cores", "1", "--progress", "none", "-o", str(target),
                "-p", f"block={target}", cwd=tmp_path,
                env={"CLUSTER_LOG_DIR": str(tmp_path / "logs")})
    line = error_line(r, ExitCode.OUTPUT_FAILED)
    [saved] = tmp_path.glob("outputs-*.npy")
    assert line == (f"cluster: error: could not write {target}: Is a directory; the result was "
                    f"saved to {saved.name} instead (a private local cluster does not outlive "
                    "its submit)")
    np.testing.assert_array_equal(np.load(saved), expected())
