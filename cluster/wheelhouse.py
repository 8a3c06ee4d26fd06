"""The wheels `cluster up` ships to hosts: this project's own wheel and its dependencies, built
on this machine, so hosts need no internet, no git checkout and no pre-installed package."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

CACHE = Path("~/.cache/cluster/wheelhouse")


@dataclass(frozen=True)
class Wheelhouse:
    path: Path
    build: str  # identifies what is installed: a hash of the project's sources
    hashes: dict[str, str] = field(default_factory=dict)  # wheel file name -> its SHA-256

    @property
    def wheels(self) -> list[Path]:
        return sorted(self.path.glob("*.whl"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hashes(path: Path) -> dict[str, str]:
    """The SHA-256 of every wheel in ``path``: what identifies a wheel, never its size."""
    return {wheel.name: sha256(wheel) for wheel in sorted(path.glob("*.whl"))}


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
        found = hashes(given)
        if not any(name.startswith("cluster-") for name in found):
            raise UsageError(f"--wheelhouse {given}: no cluster-*.whl in it")
        digest = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in found.items()).encode())
        return Wheelhouse(given, digest.hexdigest()[:12], found)
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
    return Wheelhouse(target, build, hashes(target))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
