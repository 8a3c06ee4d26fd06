"""What a job needs installed, and whether the hosts have it.

A job declares requirements (PEP 508, ``scipy>=1.11``) in its file, ``REQUIREMENTS = [...]``,
and in a ``requirements.txt`` beside it. Every agent reports what is installed where it runs
(``Installed``: distribution -> version, and the values environment markers are evaluated
with), and ``cluster submit`` refuses a job that a live agent's host cannot run
(``check_hosts``), before anything is scattered. hosts.ini's ``requirements`` is what
``cluster up`` installs on every host (``config``, ``wheelhouse``).

Pure logic, apart from reading a requirements.txt and listing this environment's distributions.
A requirement's extras are not checked, only the distribution itself; a URL requirement
(``name @ URL``) is met by any version of ``name``.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion

from .errors import JobFileError, MissingRequirements

COMMENT = re.compile(r"(^|\s)#.*$")


def parse(text: str) -> Requirement:
    """A PEP 508 requirement, or ``ValueError`` saying in one line what is wrong with it."""
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        reason = (str(exc).splitlines() or ["?"])[0]
        raise ValueError(f"{text!r} is not a requirement (name and versions, like "
                         f"'scipy>=1.11'): {reason}") from None


def read_txt(path: Path) -> tuple[Requirement, ...]:
    """A requirements.txt: one requirement per line, ``#`` comments. pip's options (-r,
    --index-url...), paths and URLs are refused, naming the line: the hosts install from the
    wheelhouse that ``cluster up`` ships, so what they need belongs in hosts.ini."""
    found = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(str(path), f"cannot read it: {exc}") from None
    for number, line in enumerate(lines, 1):
        text = COMMENT.sub("", line).strip()
        if not text:
            continue
        if text.startswith("-"):
            raise JobFileError(f"{path}:{number}", f"{text.split()[0]}: pip options are not "
                               "supported here, only requirements (hosts install from the "
                               "wheelhouse of cluster up: list local packages and indexes' "
                               "requirements in hosts.ini)")
        try:
            found.append(parse(text))
        except ValueError as exc:
            raise JobFileError(f"{path}:{number}", str(exc)) from None
    return tuple(found)


def of_job(module: ModuleType, path: str) -> tuple[Requirement, ...]:
    """The job's ``REQUIREMENTS`` (a list of str), then those of a requirements.txt in its
    directory; ``JobFileError`` naming the job file (or the line) and the bad entry."""
    declared = getattr(module, "REQUIREMENTS", [])
    if not isinstance(declared, list | tuple) or not all(isinstance(r, str) for r in declared):
        raise JobFileError(path, "REQUIREMENTS must be a list of str, like ['scipy>=1.11']")
    found = []
    for text in declared:
        try:
            found.append(parse(text))
        except ValueError as exc:
            raise JobFileError(path, f"REQUIREMENTS: {exc}") from None
    beside = Path(path).parent / "requirements.txt"
    if beside.is_file():
        found += read_txt(beside)
    return tuple(dict((str(r), r) for r in found).values())


def installed_here() -> dict[str, str]:
    """Every distribution this interpreter can import: canonical name -> version. The first
    of a name on ``sys.path`` wins, as it does for ``import``."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name, version = name_and_version(dist)
        if name:
            found.setdefault(canonicalize_name(name), version or dist.version)
    return found


def name_and_version(dist: importlib.metadata.Distribution) -> tuple[str | None, str | None]:
    """A distribution's Name and Version from the head of its metadata file: the whole file
    through ``email``'s parser (``dist.metadata``) costs 14 times as much (0.28 s for the 150
    distributions of a venv here, on an agent's way to starting its workers)."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    name = version = None
    for line in text.splitlines():
        if not line.strip():  # the end of the headers
            break
        if line.startswith("Name:"):
            name = line[5:].strip()
        elif line.startswith("Version:"):
            version = line[8:].strip()
        if name and version:
            break
    return name, version


@dataclass(frozen=True)
class Installed:
    """What one host has: distribution (canonical name) -> version, and the values of PEP 508
    markers there. ``packages`` is None when its agent does not report them (an older one)."""

    host: str
    packages: Mapping[str, str] | None
    environment: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def here(cls, host: str) -> Installed:
        markers = {name: str(value) for name, value in default_environment().items()}
        return cls(host, installed_here(), markers)

    @classmethod
    def from_agent(cls, info: Mapping[str, str]) -> Installed:
        """From an agent's registration in Redis (``fields``)."""
        host = info.get("host", "?")
        try:
            packages = json.loads(info["packages"]) if "packages" in info else None
            environment = json.loads(info.get("environment", "{}"))
        except ValueError:
            packages, environment = None, {}
        return cls(host, packages, environment)

    def fields(self) -> dict[str, str]:
        """What an agent registers in Redis (``from_agent`` reads it back)."""
        return {"packages": json.dumps(self.packages, sort_keys=True),
                "environment": json.dumps(self.environment, sort_keys=True)}

    def version(self, name: str) -> str | None:
        return (self.packages or {}).get(canonicalize_name(name))

    def lacks(self, requirement: Requirement) -> str | None:
        """None when this host meets ``requirement``; else what was found instead."""
        if requirement.marker is not None and not requirement.marker.evaluate(
                dict(self.environment) or None):
            return None  # not meant for this host
        if self.packages is None:
            return "its agent reports no packages (an older cluster: run cluster up)"
        version = self.version(requirement.name)
        if version is None:
            return "not installed"
        if not requirement.specifier:
            return None
        try:
            if requirement.specifier.contains(version, prereleases=True):
                return None
        except InvalidVersion:  # older packaging raises for a version that is not PEP 440
            pass
        return f"{version} installed"


def unmet(requirements: Iterable[Requirement], hosts: Iterable[Installed]
          ) -> dict[str, dict[str, str]]:
    """Requirement -> host -> what that host has instead, for every requirement some host
    does not meet. A host with several live agents counts once (the first that lacks it)."""
    everywhere = sorted(hosts, key=lambda h: h.host)
    missing: dict[str, dict[str, str]] = {}
    for requirement in requirements:
        for host in everywhere:
            found = host.lacks(requirement)
            if found is not None:
                missing.setdefault(str(requirement), {}).setdefault(host.host, found)
    return missing


def check_hosts(job: str, requirements: Iterable[Requirement], hosts: Iterable[Installed],
          remedy: str) -> None:
    """``MissingRequirements`` (one line: the job, each requirement, each host and what it
    has) when a host does not meet one of the job's requirements."""
    missing = unmet(requirements, hosts)
    if missing:
        raise MissingRequirements(job, missing, remedy)
