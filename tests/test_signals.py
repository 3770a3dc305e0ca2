"""SIGTERM and SIGINT stop a run in every phase: exit 143 / 130, one line, last checkpoint intact.

Each case resumes a copy of a finished round 1 for round 2 in a subprocess that signals itself
from inside one phase (the first training step, prediction step or evaluation of round 2), so
the signal arrives while that phase runs, exactly as a scheduler's or a user's would.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmkt.cli import main

SETTINGS = [
    "--config",
    "tiny",
    "--federation.evaluate_before",
    "false",
    "--federation.evaluate_every_round",
    "true",
    "--logging.wandb",
    "false",
    "--data.pool_size",
    "6",
    "--data.max_length",
    "48",
    "--data.eval_size",
    "4",
]

# Wraps the phase's entry point so that its first call sends `signal` to this very process.
DRIVER = """
import os, signal, sys
import fedmkt.federation.participant as participant
from fedmkt.cli import main
from fedmkt.party_module import PartyModule

phase, signum = sys.argv[1], getattr(signal, sys.argv[2])
owner, name = {"training": (PartyModule, "training_step"), "prediction": (PartyModule, "predict_step"),
               "evaluation": (participant, "evaluate_multiple_choice")}[phase]
original = getattr(owner, name)

def signalled(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

setattr(owner, name, signalled)
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def round_1(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("round_1") / "run"
    assert main(["fit", *SETTINGS, "--federation.rounds", "1", "--run_dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["training", "prediction", "evaluation"])
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_run_with_its_exit_code_and_the_checkpoint_intact(round_1, tmp_path, phase, name, code):
    run_dir = tmp_path / "run"
    shutil.copytree(round_1, run_dir)
    checkpoint = (run_dir / "checkpoint" / "checkpoint.json").read_bytes()
    adapters = {p: p.read_bytes() for p in (run_dir / "adapters").rglob("*") if p.is_file()}
    args = ["fit", *SETTINGS, "--federation.rounds", "2", "--resume", str(run_dir)]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, phase, name, *args], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == code == 128 + getattr(signal, name), result.stderr
    assert "Traceback" not in result.stderr and "Received SIGTERM" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"fedmkt: stopped by {name}"), result.stderr
    assert [line for line in lines if line.startswith("fedmkt:")] == lines[-1:]
    assert f"--resume {run_dir}" in lines[-1]
    # Stopped inside round 2: its adapters and checkpoint never written, round 1's byte for byte.
    assert (run_dir / "checkpoint" / "checkpoint.json").read_bytes() == checkpoint
    assert {p: p.read_bytes() for p in (run_dir / "adapters").rglob("*") if p.is_file()} == adapters
    assert not (run_dir / "adapters" / "round_2").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".")]  # no temporaries left

    if (phase, name) == ("training", "SIGTERM"):  # the line's fix works: --resume finishes round 2
        assert main(args) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [1, 2]
