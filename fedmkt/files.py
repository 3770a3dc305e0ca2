"""Crash-safe files and standard JSON: how fedmkt writes everything it keeps.

Every file and folder goes through a temporary sibling and `os.replace` (`atomic_write`), so a
crash leaves either the previous complete version or the new one, never half of one: run folders,
checkpoints, adapters, vocabulary maps, converted models. JSON is standard (a NaN or inf is written
as null) so that any tool reads it.
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


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    directory: bool = False,
    keep_existing: bool = False,
    shared: bool = False,
) -> None:
    """Have `write` fill a temporary sibling of `path` (a file, or a folder with `directory`), then
    rename it to `path`: a crash or a full disk leaves the previous version (or none), never half of one.

    A file is fsynced before the rename. With `keep_existing`, a `path` that exists by then (another
    process finished first) is kept and this write discarded. The temporary is removed on failure.
    A temporary is private to its owner (0600/0700); with `shared` the result gets the permissions
    the user's umask gives a new file or folder (what a model folder meant for others needs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(handle)
        tmp = Path(name)
    try:
        write(tmp)
        if not directory:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        if shared:
            os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
        if keep_existing and path.exists():
            return  # another process finished first; ours is removed below
        if directory and path.is_dir() and not path.is_symlink():
            _swap_in_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)  # no partial files left behind
        raise
    finally:
        if tmp.exists() and tmp != path:
            _remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path`, whose old folder is moved aside first and removed only once `new`
    is in place: a failed rename puts the old folder back, so nothing is lost on the way."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.rmdir(aside)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(path: Path, write: Callable[[Path], None], shared: bool = False) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then rename it to `path` (replacing it);
    `shared`: with the permissions the umask gives (see `atomic_write`)."""
    atomic_write(path, write, directory=True, shared=shared)


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
