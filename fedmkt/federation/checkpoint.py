"""Crash-safe files and RNG state for round checkpoints.

Every file a run writes goes through a temporary file in the same folder and `os.replace`, so a
crash leaves either the previous complete version or the new one — never half a file.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmkt.errors import FedMKTError


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


def read_checkpoint(run_dir: Path) -> dict:
    """The round checkpoint record of `run_dir`, or a one-line error naming what is wrong with it."""
    path = Path(run_dir) / "checkpoint" / "checkpoint.json"
    if not path.is_file():
        raise FedMKTError(
            f"no round checkpoint in {run_dir} ({path} is missing). "
            "Fix: pass the run_dir of a run that finished at least one round, or start afresh without --resume."
        )
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(state, dict) or not {"round", "summary", "rng"} <= set(state):
            raise ValueError("it lacks the round, summary or rng entries")
        int(state["round"])
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise FedMKTError(
            f"round checkpoint {path} is empty or damaged ({type(error).__name__}: {' '.join(str(error).split())}). "
            "Fix: the run cannot be continued from it; start afresh with --overwrite (or another run_dir)."
        ) from error
    return state


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as JSON-safe values."""
    numpy_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(_from_json(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, tuple) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
