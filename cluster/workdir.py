"""A job is its directory: packing it on the submitting machine, unpacking it on hosts.

``pack`` turns the job's directory into a deterministic gzip'd tar (same files, same bytes),
named by its SHA-256. What is skipped: ``.git`` and other version-control directories,
``__pycache__`` and tool caches, virtualenvs (any directory holding ``pyvenv.cfg``), and
``--exclude`` patterns. A symlink is shipped as a copy of what it points to, if that is inside
the tree; one that points out of it is refused.

``Cache`` is a host's store of unpacked directories, one per digest, shared by the host's
workers. An archive is verified (its digest, which the job's signature covers) before
anything is unpacked; members that are not plain files or directories, or whose names leave the
directory, and archives larger than the unpack bound are refused. Unpacking goes to a temporary
name and is renamed into place, so workers that start on a new archive at the same moment
unpack it at most once each and never see half of it. The cache keeps ``MAX_ENTRIES``
directories; the least recently used one that no worker holds is evicted. A worker holds its
job's directory with a shared ``flock`` for as long as it runs.
"""

from __future__ import annotations

import fcntl
import fnmatch
import gzip
import hashlib
import heapq
import io
import os
import shutil
import sys
import tarfile
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ClusterError, UsageError

DEFAULT_MAX_BYTES = 20_000_000  # files shipped, before compression (--max-workdir-size)
MAX_FILES = 10_000  # files in one job directory
UNPACK_LIMIT = 1 << 30  # bytes a host unpacks from one archive, whatever it claims
MAX_ENTRIES = 16  # unpacked directories a host's cache keeps
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache",
                          ".ruff_cache", ".tox", ".nox", ".ipynb_checkpoints", "node_modules"})


class ArchiveError(ClusterError):
    """An archive that must not be unpacked (tampered, unsafe members, too large)."""


@dataclass(frozen=True)
class Archive:
    """A packed job directory."""

    root: Path  # the directory on the submitting machine
    job: str  # the job file, relative to root (posix)
    data: bytes
    digest: str  # SHA-256 of data, hex
    files: int
    size: int  # bytes of the files, before compression


def pack(job_file: Path, workdir: Path | None = None, exclude: Sequence[str] = (),
         max_bytes: int = DEFAULT_MAX_BYTES) -> Archive:
    """Pack ``workdir`` (default: the job file's directory). ``UsageError`` names the problem:
    the job file outside the directory, a symlink out of it, too many or too large files."""
    root = (workdir or job_file.parent).resolve()
    job = job_file.resolve()
    if not root.is_dir():
        raise UsageError(f"--workdir {workdir}: not a directory")
    if root not in job.parents:
        raise UsageError(f"--workdir {workdir}: the job file {job_file} is not inside it")
    files: list[tuple[str, Path, int]] = []
    _walk(root, root, tuple(exclude), set(), files)
    files.sort(key=lambda f: f[0])
    size = sum(f[2] for f in files)
    if size > max_bytes:
        largest = heapq.nlargest(3, files, key=lambda f: f[2])
        named = ", ".join(f"{name} ({n / 1e6:.1f} MB)" for name, _, n in largest)
        raise UsageError(f"job directory {root} holds {size / 1e6:.1f} MB to ship, more than "
                         f"--max-workdir-size {max_bytes / 1e6:g} MB; largest: {named} (skip "
                         "files with --exclude, or choose a smaller --workdir)")
    data = _tar(files)
    return Archive(root, job.relative_to(root).as_posix(), data,
                   hashlib.sha256(data).hexdigest(), len(files), size)


def _walk(root: Path, directory: Path, exclude: tuple[str, ...], seen: set[Path],
          out: list[tuple[str, Path, int]]) -> None:
    """Add (name in the archive, real path, size) of every file to ship under ``directory``."""
    seen = seen | {directory.resolve()}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise UsageError(f"cannot read {directory}: {exc.strerror}") from None
    for entry in entries:
        path = Path(entry.path)
        name = _name_in(root, path)
        if _skipped(entry, name, exclude):
            continue
        real = path.resolve()
        if entry.is_symlink() and root != real and root not in real.parents:
            raise UsageError(f"job directory: {name} is a symlink to {real}, outside "
                             f"{root}; copy the file in, or --exclude {name}")
        if real.is_dir():
            if real not in seen:  # a symlink to a directory above it would loop
                _walk(root, path, exclude, seen, out)
        elif real.is_file():
            out.append((name, real, real.stat().st_size))
            if len(out) > MAX_FILES:
                raise UsageError(f"job directory {root} has more than {MAX_FILES} files to "
                                 "ship: choose a smaller --workdir, or --exclude some")


def _name_in(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def _skipped(entry: os.DirEntry[str], name: str, exclude: tuple[str, ...]) -> bool:
    if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(entry.name, p) for p in exclude):
        return True
    if entry.is_dir() and not entry.is_symlink():
        return entry.name in SKIPPED_DIRS or os.path.exists(os.path.join(entry.path,
                                                                          "pyvenv.cfg"))
    return entry.name.endswith((".pyc", ".pyo"))


def _tar(files: list[tuple[str, Path, int]]) -> bytes:
    """Deterministic: sorted names, no times, owners or modes beyond executable or not."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, real, _ in files:
            try:
                content = real.read_bytes()
            except OSError as exc:
                raise UsageError(f"job directory: cannot read {name}: {exc.strerror}") from None
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o755 if os.access(real, os.X_OK) else 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


# -- on a host ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cluster"


class Cache:
    """Unpacked job directories of one host, by digest."""

    def __init__(self, root: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.root = root / "workdirs"
        self.max_entries = max_entries

    def hold(self, digest: str) -> tuple[Path | None, int]:
        """Hold (shared lock, for this process's life) the directory of ``digest``; it is
        returned when it is unpacked already, else None (call ``unpack``)."""
        _check_digest(digest)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        path = self.root / digest
        if path.is_dir():
            os.utime(path)  # recently used: evicted last
            return path, fd
        return None, fd

    def unpack(self, digest: str, data: bytes) -> Path:
        """Unpack ``data`` as the directory of ``digest`` (once per host), if it is the
        archive of that digest (which the job's signature covers)."""
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArchiveError("the job directory in Redis does not match its digest (tampered "
                               "with, or damaged)")
        path = self.root / digest
        temporary = self.root / f".unpacking-{digest}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            extract(data, temporary)
            os.rename(temporary, path)
        except OSError:
            if not path.is_dir():  # not another worker's rename winning the race
                raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        self.evict(keep=digest)
        return path

    def evict(self, keep: str) -> list[str]:
        """Remove the least recently used directories beyond ``max_entries`` that no worker
        holds; returns their digests."""
        entries = sorted((p for p in self.root.iterdir() if p.is_dir()
                          and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
        evicted = []
        for path in entries[:max(0, len(entries) - self.max_entries)]:
            if path.name != keep and self._remove_if_free(path):
                evicted.append(path.name)
        return evicted

    def _remove_if_free(self, path: Path) -> bool:
        fd = os.open(self.root / f"{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            gone = self.root / f".evicted-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(path, gone)  # under the lock: a worker that holds it next unpacks anew
        finally:
            os.close(fd)
        shutil.rmtree(gone, ignore_errors=True)
        return True


def _check_digest(digest: str) -> None:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArchiveError(f"not a SHA-256 digest: {digest[:80]!r}")


def extract(data: bytes, target: Path, limit: int = UNPACK_LIMIT) -> None:
    """Unpack plain files and directories under ``target``; anything else is refused."""
    try:
        raw = _gunzip(data, limit)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            target.mkdir(parents=True)
            for member in members:
                _write_member(tar, member, target)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        raise ArchiveError(f"the job directory archive is damaged: {exc}") from None


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes: an archive bomb stops there."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise ArchiveError(f"the job directory unpacks to more than {limit >> 20} MB: refused")
    return raw


def _check_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or not name.parts or "\\" in member.name:
        raise ArchiveError(f"the job directory archive names {member.name!r}, outside the "
                           "directory: refused")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"the job directory archive holds {member.name!r}, which is not a "
                           "plain file or directory: refused")


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    path = target.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    with source, open(path, "xb") as out:
        shutil.copyfileobj(source, out)
    os.chmod(path, 0o755 if member.mode & 0o111 else 0o644)


# -- the worker's side: one job's directory as the place its code runs --------------------


class Workspace:
    """A job's unpacked directory, entered while its units run: the working directory,
    first on ``sys.path``, and the modules imported from it. A worker that runs units of two
    jobs swaps them, so each job's ``import helper`` finds its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.modules: dict[str, types.ModuleType] = {}

    def enter(self) -> None:
        os.chdir(self.path)
        sys.path.insert(0, str(self.path))
        sys.modules.update(self.modules)

    def leave(self) -> None:
        inside = str(self.path) + os.sep
        self.modules = {name: m for name, m in list(sys.modules.items())
                        if (getattr(m, "__file__", None) or "").startswith(inside)}
        for name in self.modules:
            del sys.modules[name]
        if str(self.path) in sys.path:
            sys.path.remove(str(self.path))
