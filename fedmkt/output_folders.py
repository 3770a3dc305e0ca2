"""Folders a command replaces as a whole: only its own earlier output, never the user's work.

`fedmkt export --out` writes a folder and replaces one already there. A folder it may replace is
new, empty, or an earlier fedmkt export (it holds `EXPORT_MARKER`); the current folder, a folder
above it, the run being exported and anything inside that run are refused before any model is
loaded, each with one line that names the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmkt.errors import FedMKTError

EXPORT_MARKER = "fedmkt_export.json"
"""The file that marks a folder as a fedmkt export (what it holds: run, party, round, merged or not)."""

_EXAMPLE = "--out exports/client_0"


def export_marker_text(run_dir: Path, party: str, round_index: int, merge: bool) -> str:
    """The marker's JSON: which run, party and round the export holds."""
    record = {"fedmkt_export": 1, "run": str(Path(run_dir).resolve()), "party": party, "round": round_index}
    return json.dumps({**record, "merged": merge}, indent=2) + "\n"


def check_export_target(out: str | Path, run_dir: str | Path) -> Path:
    """The resolved folder `export` may write to `out` (replacing an earlier export there); refuses any other."""
    if not str(out).strip():
        raise FedMKTError(f"--out is empty. Fix: name a new folder for the export, e.g. {_EXAMPLE}.")
    target = Path(out).expanduser().resolve()
    here = Path.cwd().resolve()
    run = Path(run_dir).expanduser().resolve()
    if target == here or target in here.parents:
        raise FedMKTError(
            f"--out {out} is the current folder or one above it, which the export would replace. "
            f"Fix: name a new folder, e.g. {_EXAMPLE}."
        )
    if target == run or run in target.parents:
        raise FedMKTError(
            f"--out {out} is the run folder {run_dir} or inside it, which the export would replace. "
            f"Fix: name a folder outside the run, e.g. {_EXAMPLE}."
        )
    if target in run.parents:
        raise FedMKTError(
            f"--out {out} holds the run folder {run_dir}, which the export would replace. "
            f"Fix: name a folder outside the run, e.g. {_EXAMPLE}."
        )
    if target.exists() and not target.is_dir():
        raise FedMKTError(f"--out {out} is a file, not a folder. Fix: name a new folder, e.g. {_EXAMPLE}.")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARKER).is_file():
        raise FedMKTError(
            f"--out {out} is a folder with other files in it, not an earlier fedmkt export (no {EXPORT_MARKER}). "
            f"Fix: name a new or empty folder, e.g. {_EXAMPLE}; fedmkt replaces only its own exports."
        )
    return target
