"""The wheels `cluster up` ships to hosts: this project's own wheel and its dependencies, built
on this machine, so hosts need no internet, no git checkout and no pre-installed package.

hosts.ini's ``requirements`` are built into a wheelhouse of their own, which holds the project's
wheels too: pip resolves them together with cluster, from the wheels at hand (the project's
wheelhouse, local packages built here) before it asks an index. Both are cached under
``~/.cache/cluster/wheelhouse``: the project's by its sources, the requirements' by the
project's build, the requirement strings and the content of the local packages.

A wheelhouse also carries pip's own wheel, from this Python's ``ensurepip``: hosts create their
virtualenv without pip (installing pip into it is most of the time ``venv`` takes) and run pip
from that wheel, as pip allows (``python pip-*.whl/pip install ...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from .errors import UsageError
from .requirements import parse

CACHE = Path("~/.cache/cluster/wheelhouse")
# what our dependencies need on an older patch release of this Python, which a host may have
# (the wheelhouse is resolved here): redis-py wants async-timeout below 3.11.3 (Debian 12: 3.11.2)
FOR_OLDER_PATCHES = ("async-timeout>=4.0.3",)


@dataclass(frozen=True)
class Wheelhouse:
    path: Path
    build: str  # identifies the cluster installed: a hash of the project's sources
    hashes: dict[str, str] = field(default_factory=dict)  # wheel file name -> its SHA-256
    installs: tuple[str, ...] = ()  # what pip installs besides cluster: hosts.ini's requirements
    local: tuple[str, ...] = ()  # wheels built from local packages (reinstalled when changed)

    @property
    def wheels(self) -> list[Path]:
        return sorted(self.path.glob("*.whl"))

    @property
    def pip(self) -> str | None:
        """The name of pip's wheel in this wheelhouse, if it holds one (the newest)."""
        newest = newest_pip([Path(name) for name in self.hashes])
        return newest.name if newest is not None else None

    @property
    def requirements_id(self) -> str:
        """Identifies the requirements installed ("" for none): their list and local wheels."""
        if not self.installs:
            return ""
        listed = [*self.installs, *(self.hashes.get(name, "") for name in self.local)]
        return hashlib.sha256("\n".join(listed).encode()).hexdigest()[:12]

    @property
    def agent_build(self) -> str:
        """What an agent runs: an agent started before a change to it is restarted by up."""
        return f"{self.build}+{self.requirements_id}" if self.installs else self.build


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


def prepare(given: Path | None = None, cache: Path = CACHE, requirements: Sequence[str] = (),
            packages: Sequence[Path] = ()) -> Wheelhouse:
    """A wheelhouse for hosts: ``given`` as it is, or one built (once per source version); with
    ``requirements`` and local ``packages`` built into it (once per version of them)."""
    project = _project(given, cache)
    if not requirements and not packages:
        return project
    return _with_requirements(project, cache.expanduser(), tuple(requirements), tuple(packages))


def _project(given: Path | None, cache: Path) -> Wheelhouse:
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
        staging = _staging(cache)
        problem = _pip("wheel", "--wheel-dir", str(staging), str(root), *FOR_OLDER_PATCHES)
        if problem:
            shutil.rmtree(staging, ignore_errors=True)
            raise UsageError(f"building the wheelhouse failed: {problem}")
        pip = bundled_pip()
        if pip is not None:
            shutil.copy2(pip, staging / pip.name)
        _complete(staging, target)
    return Wheelhouse(target, build, hashes(target))


def _with_requirements(project: Wheelhouse, cache: Path, requirements: tuple[str, ...],
                       packages: tuple[Path, ...]) -> Wheelhouse:
    identity = [project.build, *requirements, *(content_hash(p) for p in packages)]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]
    target = cache / f"{project.build}+{digest}"
    if not (target / ".complete").exists():
        staging = _staging(cache)
        try:
            _build_requirements(project, staging, requirements, packages)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _complete(staging, target)
    manifest = json.loads((target / "requirements.json").read_text())
    return Wheelhouse(target, project.build, hashes(target), tuple(manifest["installs"]),
                      tuple(manifest["local"]))


def _build_requirements(project: Wheelhouse, staging: Path, requirements: tuple[str, ...],
                        packages: tuple[Path, ...]) -> None:
    """Wheels for cluster and ``requirements`` and ``packages``, resolved together, into
    ``staging``; and its ``requirements.json``: what hosts install, and the local wheels."""
    ours = next(project.path.glob("cluster-*.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        local = [p if p.suffix == ".whl" else _build_local(p, Path(tmp) / str(i))
                 for i, p in enumerate(packages)]
        args = ["--wheel-dir", str(staging), "--find-links", str(project.path), str(ours),
                *map(str, local), *requirements]
        # from the wheels at hand if they are enough, else from an index too
        problem = _pip("wheel", "--no-index", *args) and _pip("wheel", *args)
        if problem:
            raise UsageError(f"building the requirements of hosts.ini failed: {problem}")
    kept = {"pip", *(canonicalize_name(parse(extra).name) for extra in FOR_OLDER_PATCHES)}
    for wheel in project.path.glob("*.whl"):  # what pip left out here: hosts need it
        if parse_wheel_filename(wheel.name)[0] in kept:
            shutil.copy2(wheel, staging / wheel.name)
    names = [parse_wheel_filename(wheel.name)[:2] for wheel in local]
    manifest = {"installs": [*map(_for_hosts, requirements),
                             *(f"{name}=={version}" for name, version in names)],
                "local": [wheel.name for wheel in local]}
    (staging / "requirements.json").write_text(json.dumps(manifest, indent=1))


def bundled_pip() -> Path | None:
    """pip's wheel as this Python's ``ensurepip`` holds it (Debian keeps it apart, in
    ``WHEEL_PKG_DIR``); None if this Python has none."""
    import ensurepip

    places = [sysconfig.get_config_var("WHEEL_PKG_DIR"),
              Path(ensurepip.__file__).parent / "_bundled"]
    return newest_pip([wheel for place in places if place for wheel in Path(place).glob("*.whl")])


def newest_pip(wheels: Sequence[Path]) -> Path | None:
    """The wheel of pip's newest version among ``wheels``."""
    found = [wheel for wheel in wheels if wheel.name.startswith("pip-")]
    return max(found, key=lambda wheel: parse_wheel_filename(wheel.name)[1], default=None)


def _build_local(path: Path, out: Path) -> Path:
    """The wheel of a local project directory, built here (its own dependencies are resolved
    with the others)."""
    problem = _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(path))
    built = sorted(out.glob("*.whl"))
    if problem or len(built) != 1:
        raise UsageError(f"building {path} failed: {problem or 'no single wheel came out'}")
    return built[0]


def _for_hosts(requirement: str) -> str:
    """How hosts ask pip for a requirement: a URL one by its name (hosts have no internet;
    its wheel is in the wheelhouse)."""
    parsed = parse(requirement)
    if parsed.url is None:
        return requirement
    extras = f"[{','.join(sorted(parsed.extras))}]" if parsed.extras else ""
    return f"{parsed.name}{extras}"


def content_hash(path: Path) -> str:
    """What identifies a local package: a wheel's SHA-256, or a hash of a project directory's
    files (not those that building it leaves, nor version control's)."""
    if path.is_file():
        return sha256(path)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info"))
        for name in sorted(files):
            file = Path(folder) / name
            digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


SKIPPED = {".git", ".hg", "build", "dist", "__pycache__", ".tox", ".nox", ".venv", "venv",
           ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def _pip(*args: str) -> str | None:
    """Run pip with this interpreter; None on success, else the last line it wrote."""
    result = subprocess.run([sys.executable, "-m", "pip", "--quiet", *args],
                            capture_output=True, text=True)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or ["?"])[-1]


def _staging(cache: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=_mkdir(cache.expanduser())))


def _complete(staging: Path, target: Path) -> None:
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
