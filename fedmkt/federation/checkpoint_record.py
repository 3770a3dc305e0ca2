"""A run folder's round checkpoint record (`checkpoint/checkpoint.json`), read without torch.

What `--resume` refuses without a model (no checkpoint, a damaged one, a run that has finished)
is decided from this record alone, so the command answers before its heavy imports.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmkt.errors import FedMKTError

__all__ = ["resume_folder", "read_checkpoint", "finished_line"]


def resume_folder(resume: str) -> Path:
    """The folder a `--resume` names, or a one-line error when it is a file or missing."""
    folder = Path(resume)
    if folder.exists() and not folder.is_dir():
        raise FedMKTError(f"--resume {resume} is a file, not a folder. Fix: pass the run_dir of the interrupted run.")
    if not folder.is_dir():
        raise FedMKTError(f"--resume folder {resume} does not exist. Fix: pass the run_dir of the interrupted run.")
    return folder


def read_checkpoint(run_dir: Path) -> dict:
    """The round checkpoint record of `run_dir`, or a one-line error naming what is wrong with it."""
    path = Path(run_dir) / "checkpoint" / "checkpoint.json"
    if not path.is_file():
        raise FedMKTError(
            f"no round checkpoint in {run_dir} ({path} is missing). "
            "Fix: pass the run_dir of a run that finished at least one round, or start this one again with "
            "--overwrite in place of --resume (nothing of it can be continued)."
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


def finished_line(run_dir: Path, rounds: int) -> str:
    """What a `--resume` of a run that has done all its `rounds` prints (it has nothing left to do)."""
    return (
        f"fedmkt: {run_dir} already finished all {rounds} rounds; nothing left to do "
        "(raise --federation.rounds to continue it further)."
    )
