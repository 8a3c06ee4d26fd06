"""A tiny Python project that the tests build themselves, with no index: its pyproject.toml
names an in-tree PEP 517 backend that needs nothing, so ``pip wheel`` builds it offline."""

from __future__ import annotations

from pathlib import Path

BACKEND = '''\
"""A PEP 517 backend that writes a wheel of the module beside it, needing nothing."""
import base64, hashlib, zipfile
from pathlib import Path

NAME, VERSION = {name!r}, {version!r}
INFO = f"{{NAME}}-{{VERSION}}.dist-info"


def _line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{{name}},sha256={{digest}},{{len(data)}}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {{
        f"{{NAME}}.py": Path(__file__).with_name(f"{{NAME}}.py").read_bytes(),
        f"{{INFO}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
        .encode(),
        f"{{INFO}}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: tests\\nRoot-Is-Purelib: true\\n"
        b"Tag: py3-none-any\\n",
    }}
    record = [*(_line(n, d) for n, d in files.items()), f"{{INFO}}/RECORD,,", ""]
    wheel = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / wheel, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{{INFO}}/RECORD", "\\n".join(record))
    return wheel
'''


def make_project(where: Path, name: str = "tinydep", version: str = "1.0",
                 source: str = "VALUE = 42\n") -> Path:
    """A project directory of one module, ``name`` (``source``), at ``version``."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n')
    (where / "backend.py").write_text(BACKEND.format(name=name, version=version))
    (where / f"{name}.py").write_text(source)
    return where
