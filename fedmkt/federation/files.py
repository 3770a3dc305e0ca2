"""Crash-safe files and standard JSON: how a run writes what it keeps.

Every file goes through a temporary file in the same folder and `os.replace`, so a crash leaves
either the previous complete version or the new one — never half a file. JSON is standard (a NaN
or inf is written as null) so that any tool reads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (fsync, then rename over the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no partial files left behind
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then rename it to `path`.

    A crash or a full disk while writing leaves the previous folder (or none), never a folder with
    half its files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finite_or_none(value: Any) -> Any:
    """A copy of a JSON-like tree with non-finite floats replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_default(value: Any) -> Any:
    """What `json.dumps` cannot write by itself: paths (as strings) and tuples (as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def standard_json(value: Any, indent: int | None = None) -> str:
    """`value` as standard JSON: non-finite floats as null, paths as strings, tuples as lists."""
    return json.dumps(finite_or_none(value), indent=indent, default=json_default, allow_nan=False)
