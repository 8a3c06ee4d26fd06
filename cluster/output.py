"""Showing and saving what ``gather`` returned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

FORMATS = (".npy", ".npz", ".json", ".png")


def render(value: Any) -> str:
    """A readable text form of a result, for the terminal."""
    if isinstance(value, np.ndarray):
        text = np.array2string(value, threshold=64, edgeitems=3, max_line_width=100)
        return f"array of shape {value.shape}, dtype {value.dtype}:\n{text}"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {render(v)}" for k, v in value.items())
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def check_path(path: str) -> None:
    """Refuse an output file we could not write before the job runs, not after."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--output {path}: unknown format {suffix or '(none)'}; "
                         f"use one of {', '.join(FORMATS)}")
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"--output {path}: directory {parent} does not exist")


def write(path: str, value: Any) -> Path:
    """Write ``value`` in the format the suffix names. When the value does not fit that format
    it is written as JSON next to it instead (never lost); the path written is returned."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".npz" and isinstance(value, dict):
        arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in value.items()}
        np.savez(target, **arrays)
    elif suffix == ".npy" and _array_like(value):
        np.save(target, np.asarray(value))
    elif suffix == ".png" and _image(value):
        _write_png(target, np.asarray(value))
    else:
        if suffix != ".json":
            target = target.with_suffix(target.suffix + ".json")
        target.write_text(json.dumps(value, default=_jsonable, indent=1) + "\n")
    return target


def _array_like(value: Any) -> bool:
    try:
        return np.asarray(value).dtype.kind in "biufcmM?"
    except (ValueError, TypeError):
        return False


def _image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype == np.uint8


def _write_png(target: Path, image: np.ndarray) -> None:
    try:
        import png
    except ImportError:
        raise UsageError("writing PNG needs pypng: pip install 'cluster[png]'") from None
    rows = image.reshape(image.shape[0], -1)
    greyscale = image.ndim == 2
    planes = 1 if greyscale else image.shape[2]
    png.Writer(image.shape[1], image.shape[0], greyscale=greyscale,
               alpha=planes in (2, 4), bitdepth=8).write(target.open("wb"), rows.tolist())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
