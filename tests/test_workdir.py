"""A job is its directory: packed on the submitting machine, verified and unpacked once per
host, and run in with ``import helper`` and relative paths working as with ``python job.py``."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import AgentProcess, run_cli
from waiting import wait_for

from cluster.broker import Broker
from cluster.errors import ExitCode, UsageError
from cluster.workdir import Archive, ArchiveError, Cache, extract, pack

JOB = '''
import os
import time
import helper_mod
from pkg import OFFSET

PARAMS = {"units": 6, "pause": 0.0}


def scatter(params):
    for i in range(params["units"]):
        yield {"i": i, "pause": params["pause"]}


def compute(unit):
    time.sleep(unit["pause"])
    with open("data/table.csv") as f:
        rows = [int(line) for line in f]
    here = os.path.dirname(os.path.abspath(__file__))
    return {"v": helper_mod.triple(unit["i"]) + OFFSET + sum(rows), "cwd": os.getcwd(),
            "file_dir": here}


def gather(results, params):
    return {"total": sum(r["v"] for r in results),
            "cwds": sorted({r["cwd"] for r in results}),
            "same": all(r["cwd"] == r["file_dir"] for r in results)}
'''


def expected_total(units: int) -> int:
    """triple(i), OFFSET and the sum of the table, per unit."""
    return sum(3 * i + 100 + 6 for i in range(units))


def make_project(root: Path, marker: str = "") -> Path:
    """A job with a helper module, a package and a data file read by a relative path."""
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "helper_mod.py").write_text(f"# {marker}\ndef triple(x):\n    return 3 * x\n")
    (root / "pkg" / "__init__.py").write_text("from .sub.mod import OFFSET\n")
    (root / "pkg" / "sub" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "mod.py").write_text("OFFSET = 100\n")
    (root / "data" / "table.csv").write_text("1\n2\n3\n")
    job = root / "uses_helper.py"
    job.write_text(JOB)
    return job


def members(archive: Archive) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive.data))) as tar:
        return sorted(m.name for m in tar.getmembers())


# -- packing --------------------------------------------------------------------------------


def test_packing_is_deterministic_and_skips_what_does_not_belong(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p")
    for junk in (".git/HEAD", "__pycache__/x.pyc", "venv/pyvenv.cfg", "venv/lib/big.py",
                 "notes/draft.tmp", "pkg/sub/mod.pyc"):
        (tmp_path / "p" / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p" / junk).write_text("junk")
    first = pack(job, exclude=["*.tmp"])
    os.utime(tmp_path / "p" / "helper_mod.py", (1, 1))  # times do not change the archive
    again = pack(job, exclude=["*.tmp"])
    assert first.digest == again.digest and first.data == again.data
    assert members(first) == ["data/table.csv", "helper_mod.py", "pkg/__init__.py",
                              "pkg/sub/__init__.py", "pkg/sub/mod.py", "uses_helper.py"]
    assert first.job == "uses_helper.py" and first.files == 6
    (tmp_path / "p" / "data" / "table.csv").write_text("1\n2\n4\n")
    assert pack(job, exclude=["*.tmp"]).digest != first.digest


def test_a_directory_over_the_cap_is_refused_naming_its_largest_files(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p")
    (tmp_path / "p" / "data" / "huge.bin").write_bytes(b"\0" * 3_000_000)
    (tmp_path / "p" / "medium.bin").write_bytes(b"\0" * 1_500_000)
    with pytest.raises(UsageError, match=r"more than --max-workdir-size 2 MB; largest: "
                                         r"data/huge.bin \(3.0 MB\), medium.bin \(1.5 MB\)"):
        pack(job, max_bytes=2_000_000)
    assert pack(job, exclude=["*.bin"], max_bytes=2_000_000).files == 6


def test_a_symlink_out_of_the_tree_is_refused_one_inside_is_shipped(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p")
    (tmp_path / "secret.txt").write_text("not yours")
    (tmp_path / "p" / "copy.csv").symlink_to(tmp_path / "p" / "data" / "table.csv")
    archive = pack(job)
    assert "copy.csv" in members(archive)
    (tmp_path / "p" / "data" / "escape").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(UsageError, match="data/escape is a symlink to .*secret.txt, outside"):
        pack(job)


def test_a_workdir_must_hold_the_job_file(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p")
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match="is not inside it"):
        pack(job, tmp_path / "other")


# -- unpacking ------------------------------------------------------------------------------


def tar_of(*members: tarfile.TarInfo, content: bytes = b"x") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info in members:
            if info.isfile():
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return gzip.compress(raw.getvalue())


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member, words", [
    (tarfile.TarInfo("../escape.py"), "outside the directory"),
    (tarfile.TarInfo("/etc/passwd"), "outside the directory"),
    (tarfile.TarInfo("a/../../b"), "outside the directory"),
    (symlink("link", "/etc/passwd"), "not a plain file or directory"),
])
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path: Path,
                                                               member: tarfile.TarInfo,
                                                               words: str) -> None:
    with pytest.raises(ArchiveError, match=words):
        extract(tar_of(tarfile.TarInfo("fine.py"), member), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_archive_bomb_stops_at_the_bound(tmp_path: Path) -> None:
    bomb = tar_of(tarfile.TarInfo("zeros"), content=b"\0" * 5_000_000)
    assert len(bomb) < 10_000
    with pytest.raises(ArchiveError, match="unpacks to more than 1 MB"):
        extract(bomb, tmp_path / "out", limit=1 << 20)


def test_a_tampered_archive_is_refused(tmp_path: Path) -> None:
    archive = pack(make_project(tmp_path / "p"))
    cache = Cache(tmp_path / "cache")
    cache.hold(archive.digest)
    with pytest.raises(ArchiveError, match="does not match its digest"):
        cache.unpack(archive.digest, archive.data[:-1] + b"!")
    assert not (cache.root / archive.digest).exists()


def _unpack_at_once(args: tuple[str, str, bytes, int]) -> tuple[str, int]:
    root, digest, data, _ = args
    cache = Cache(Path(root))
    path, _fd = cache.hold(digest)
    if path is None:
        path = cache.unpack(digest, data)
    return str(path), (path / "helper_mod.py").stat().st_ino


def test_workers_starting_at_once_share_one_unpacked_copy(tmp_path: Path) -> None:
    archive = pack(make_project(tmp_path / "p"))
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        seen = pool.map(_unpack_at_once, [(str(tmp_path / "c"), archive.digest, archive.data,
                                           i) for i in range(6)])
    assert len(set(seen)) == 1  # one directory, the same files for every worker
    assert [p.name for p in (tmp_path / "c" / "workdirs").iterdir()
            if not p.name.endswith(".lock")] == [archive.digest]


def test_the_cache_evicts_the_oldest_copy_no_worker_holds(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_entries=2)
    archives = [pack(make_project(tmp_path / f"p{i}", marker=str(i))) for i in range(4)]
    held = []
    for i, archive in enumerate(archives):
        path, fd = cache.hold(archive.digest)
        cache.unpack(archive.digest, archive.data)
        os.utime(cache.root / archive.digest, (i, i))
        if i == 0:
            held.append(fd)  # a running worker holds the oldest
        else:
            os.close(fd)
    left = sorted(p.name for p in cache.root.iterdir() if not p.name.endswith(".lock"))
    # the held oldest survives; of the others, the oldest went first
    assert archives[0].digest in left and archives[1].digest not in left
    assert archives[3].digest in left
    os.close(held[0])
    assert archives[0].digest in cache.evict(keep=archives[3].digest)


# -- whole runs -----------------------------------------------------------------------------


def test_a_job_directory_runs_on_the_local_cluster(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p", marker="local")
    r = run_cli("submit", str(job), "--progress", "none", "-o", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    value = json.loads((tmp_path / "out.json").read_text())
    assert value["total"] == expected_total(6) and value["same"], value
    [cwd] = value["cwds"]
    assert Path(cwd).parent.name == "workdirs" and Path(cwd).name == pack(job).digest


def test_a_tampered_archive_in_redis_is_refused_by_workers(creds_file: Path, broker: Broker,
                                                           tmp_path: Path) -> None:
    job = make_project(tmp_path / "p", marker="tampered")
    submit = subprocess.Popen(
        [sys.executable, "-m", "cluster", "submit", str(job), "--credentials", str(creds_file),
         "--progress", "none", "--max-attempts", "1", "--worker-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jid = wait_for(lambda: next(iter(broker.client.smembers(broker.keys.jobs)), None), 30,
                       "the job to be registered").decode()
        data = broker.workdir(jid)
        assert data is not None
        broker.client.set(broker.keys.workdir(jid), data[:-1] + bytes([data[-1] ^ 1]))
        agent = AgentProcess(creds_file, cores=1)  # workers only now: the archive is tampered
        try:
            out, err = submit.communicate(timeout=60)
        finally:
            agent.stop()
    finally:
        submit.kill()
    assert submit.returncode == ExitCode.JOB_FAILED, err
    assert "does not match its digest" in err and out == ""


def test_refusals_of_submit_are_one_line_before_anything_runs(tmp_path: Path) -> None:
    job = make_project(tmp_path / "p")
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "p" / "link.txt").symlink_to(tmp_path / "outside.txt")
    r = run_cli("submit", str(job), "--redis", "redis://127.0.0.1:1/0")
    assert r.returncode == ExitCode.USAGE
    assert r.stderr.count("\n") == 1 and "link.txt is a symlink to" in r.stderr
    (tmp_path / "p" / "link.txt").unlink()
    (tmp_path / "p" / "big.bin").write_bytes(b"\0" * 1_200_000)
    r = run_cli("submit", str(job), "--max-workdir-size", "1", "--redis", "redis://127.0.0.1:1/0")
    assert r.returncode == ExitCode.USAGE
    assert r.stderr.count("\n") == 1 and "largest: big.bin (1.2 MB)" in r.stderr
