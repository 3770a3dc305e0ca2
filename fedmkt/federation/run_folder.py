"""A run's folder: one run per folder (an OS file lock), replaced only when asked, resumed from its checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.checkpoint import check_resumable, read_checkpoint
from fedmkt.federation.checkpoint_record import resume_folder

RUN_OUTPUTS = ("config.yaml", "summary.json", "checkpoint", "adapters", "tokenizers", "logs", "wandb")

LOCK_FILE = "run.lock"


def _held_outputs(run_dir: Path) -> list[str]:
    """The run outputs already in `run_dir`, by name."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("logs_resumed_"))


def launched_peer_rank() -> bool:
    """A ddp/fsdp rank > 0 re-running this command: rank 0 already owns and prepared the run_dir."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) > 0


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> FileLock:
    """Lock `run_dir` for this run and make sure it holds no other run's results.

    A second run on the same folder is refused while the first holds the lock; a folder holding a
    run is refused unless the run resumes it or `--overwrite` asks to replace it. `--overwrite`
    removes only a run's own outputs, and only in a folder a fedmkt run has claimed before (it holds
    `run.lock`): a user's own `config.yaml` or `logs/` in a folder never used as a run_dir stay.
    """
    claimed_before = (run_dir / LOCK_FILE).is_file()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / LOCK_FILE))
        lock.acquire(timeout=0)
    except Timeout:
        raise FedMKTError(
            f"run_dir {run_dir} is in use by another fedmkt run (it holds {run_dir / LOCK_FILE}). "
            "Fix: wait for that run to finish, or give this one another --run_dir."
        ) from None
    except OSError as error:
        raise FedMKTError(
            f"cannot write to run_dir {run_dir} ({type(error).__name__}: {error.strerror or error}). "
            "Fix: choose a writable --run_dir, or fix the folder's permissions."
        ) from error
    held = _held_outputs(run_dir)
    if held and not resume and not overwrite and not (run_dir / "checkpoint" / "checkpoint.json").is_file():
        lock.release()
        raise FedMKTError(
            f"run_dir {run_dir} holds a run stopped before its first round checkpoint ({', '.join(held)}), "
            "so there is nothing to --resume. Fix: start it again with --overwrite, or give another --run_dir."
        )
    if held and not resume and not overwrite:
        lock.release()
        raise FedMKTError(
            f"run_dir {run_dir} already holds a run ({', '.join(held)}). "
            f"Fix: continue it with --resume {run_dir}, replace it with --overwrite, or give another --run_dir."
        )
    if held and overwrite and not claimed_before:
        lock.release()
        raise FedMKTError(
            f"run_dir {run_dir} holds {', '.join(held)} but no fedmkt run ever used it (no {LOCK_FILE}), "
            "so --overwrite will not remove them. Fix: give another --run_dir, or move those files yourself."
        )
    if overwrite:
        for name in held:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def resume_state(config: RunConfig, resume: str) -> dict:
    """The checkpoint a `--resume` continues (checked against `config`)."""
    folder = resume_folder(resume)
    state = read_checkpoint(folder)
    check_resumable(state, config, folder)
    return state
