"""The wheels `cluster up` ships to hosts: this project's own wheel and its dependencies, built
on this machine, so hosts need no internet, no git checkout and no pre-installed package."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

CACHE = Path("~/.cache/cluster/wheelhouse")


@dataclass(frozen=True)
class Wheelhouse:
    path: Path
    build: str  # identifies what is installed: a hash of the project's sources

    @property
    def wheels(self) -> list[Path]:
        return sorted(self.path.glob("*.whl"))


def project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise UsageError("cluster up ships this project as a wheel and needs its source tree "
                         "(pip install -e .), or a ready wheelhouse: --wheelhouse DIR")
    return root


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in [root / "pyproject.toml", *sorted((root / "cluster").glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def prepare(given: Path | None = None, cache: Path = CACHE) -> Wheelhouse:
    """A wheelhouse for hosts: ``given`` as it is, or one built (once per source version)."""
    if given is not None:
        wheels = sorted(given.glob("*.whl"))
        if not any(w.name.startswith("cluster-") for w in wheels):
            raise UsageError(f"--wheelhouse {given}: no cluster-*.whl in it")
        digest = hashlib.sha256("".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode())
        return Wheelhouse(given, digest.hexdigest()[:12])
    root = project_root()
    build = source_hash(root)
    target = cache.expanduser() / build
    if not (target / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=_mkdir(cache.expanduser())))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(staging),
             str(root)], capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            raise UsageError(f"building the wheelhouse failed: {last}")
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return Wheelhouse(target, build)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
