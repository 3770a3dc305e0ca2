"""Failing clients, end to end on tiny.yaml (2 clients, real tokenizers, random-init models).

A client that raises or times out is left out of the round and recorded in summary.json; below
`federation.min_clients` the run stops with a one-line error (exit code 2) and the last round
checkpoint stays valid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmkt.cli import main
from fedmkt.federation.participant import Participant

# 6 pooled questions: 2 public + 2 private per client, so each phase is one batch; evaluation off.
SETTINGS = [
    "--config",
    "tiny",
    "--federation.evaluate_before",
    "false",
    "--federation.evaluate_every_round",
    "false",
    "--logging.wandb",
    "false",
    "--logging.csv",
    "false",
    "--data.pool_size",
    "6",
    "--data.max_length",
    "48",
]


def _temporaries(run_dir: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes: dot-prefixed temporaries or `.tmp` files."""
    return [p for p in run_dir.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fedmkt:")]
    assert len(lines) == 1, err
    assert "Fix:" in lines[0]
    return lines[0]


def test_a_client_that_raises_or_times_out_is_left_out_and_recorded(tmp_path, monkeypatch):
    """Round 1: client_1 raises in fine_tune. Round 2: its phase runs past a deadline (PhaseTimeout)."""
    run_dir = tmp_path / "run"
    original = Participant.fine_tune

    def failing_fine_tune(self, round_index):
        if self.name == "client_1" and round_index == 1:
            raise RuntimeError("simulated crash\nin client_1")
        if self.name == "client_1" and round_index == 2:
            self.phase_timeout_s = 1e-6  # the real PhaseDeadlineCallback fires at the first batch boundary
        return original(self, round_index)

    monkeypatch.setattr(Participant, "fine_tune", failing_fine_tune)
    with pytest.warns(UserWarning, match="client_1 failed and was left out"):
        assert main(["fit", *SETTINGS, "--federation.rounds", "2", "--run_dir", str(run_dir)]) == 0

    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["rounds"]
    assert first["failed"] == {"client_1": "RuntimeError: simulated crash in client_1"}  # one line
    assert first["parties"]["client_1"]["failed"] == first["failed"]["client_1"]
    assert second["failed"].keys() == {"client_1"}
    assert second["failed"]["client_1"].startswith("PhaseTimeout: phase exceeded its 1e-06 s limit")
    for record in (first, second):
        parties = record["parties"]
        # The server distilled from the client that answered, and only from it.
        assert set(parties["server"]["teacher_counts"]) == {"client_0"}
        assert sum(parties["server"]["teacher_counts"].values()) == parties["server"]["selected"]
        # client_0 took part in the whole round; client_1 sent and received nothing.
        assert "failed" not in parties["client_0"] and set(parties["client_0"]["teacher_counts"]) == {"server"}
        assert parties["client_0"]["bytes_sent"] > 0 and parties["client_0"]["bytes_received"] > 0
        assert parties["client_1"]["bytes_sent"] == parties["client_1"]["bytes_received"] == 0
        assert parties["server"]["bytes_sent"] == parties["client_0"]["bytes_received"]
        assert parties["server"]["bytes_received"] == parties["client_0"]["bytes_sent"]
    assert json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())["round"] == 2
    assert not _temporaries(run_dir)


@pytest.mark.slow
def test_below_min_clients_the_run_stops_with_one_line_and_the_round_1_checkpoint_intact(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    original = Participant.fine_tune
    snapshot = {}

    def failing_fine_tune(self, round_index):
        if round_index == 2 and self.name == "client_0":  # round 1 is complete: remember its checkpoint
            snapshot["checkpoint"] = (run_dir / "checkpoint" / "checkpoint.json").read_bytes()
            snapshot["summary"] = (run_dir / "summary.json").read_bytes()
            snapshot["adapters"] = {
                p: p.read_bytes() for p in (run_dir / "adapters" / "round_1").rglob("*") if p.is_file()
            }
        if round_index == 2 and self.name == "client_1":
            raise RuntimeError("simulated crash in client_1")
        return original(self, round_index)

    monkeypatch.setattr(Participant, "fine_tune", failing_fine_tune)
    args = ["fit", *SETTINGS, "--federation.rounds", "2", "--federation.min_clients", "2", "--run_dir", str(run_dir)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    for needle in (
        "round 2",
        "only 1 of 2 clients answered",
        "federation.min_clients=2",
        "client_1: RuntimeError: simulated crash",
        "--resume",
    ):
        assert needle in line, (needle, line)

    # Nothing of round 2 was written; round 1's checkpoint, summary and adapters are byte for byte intact.
    assert snapshot, "round 2 never started"
    assert (run_dir / "checkpoint" / "checkpoint.json").read_bytes() == snapshot["checkpoint"]
    assert (run_dir / "summary.json").read_bytes() == snapshot["summary"]
    assert {p: p.read_bytes() for p in (run_dir / "adapters" / "round_1").rglob("*") if p.is_file()} == snapshot[
        "adapters"
    ]
    assert json.loads(snapshot["checkpoint"])["round"] == 1
    assert not (run_dir / "adapters" / "round_2").exists()
    assert not _temporaries(run_dir)

    # The error's fix works: with the client repaired, --resume finishes round 2 from that checkpoint.
    monkeypatch.setattr(Participant, "fine_tune", original)
    assert main(["fit", "--config", str(run_dir / "config.yaml"), "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["rounds"][1]["failed"] == {}


def test_a_client_timeout_makes_every_slow_client_fail_with_phase_timeout(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "fit",
        *SETTINGS,
        "--federation.rounds",
        "1",
        "--federation.client_timeout_s",
        "1e-6",
        "--run_dir",
        str(run_dir),
    ]
    assert main(args) == 2  # both clients timed out alike in round 1: the timeout value is the cause
    line = _one_error_line(capsys)
    assert "round 1: every client failed the same way" in line and "configuration error" in line
    assert "PhaseTimeout: phase exceeded its 1e-06 s limit" in line
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "adapters").exists()
    assert not _temporaries(run_dir)


@pytest.mark.slow
def test_a_client_that_fails_its_evaluation_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = Participant.evaluate

    def failing_evaluate(self):
        if self.name == "client_1" and self.round_index == 1:
            raise RuntimeError("out of memory while scoring")
        return original(self)

    monkeypatch.setattr(Participant, "evaluate", failing_evaluate)
    every_round = ["--federation.evaluate_every_round", "true", "--federation.rounds", "2"]
    with pytest.warns(UserWarning, match="round 1: client_1 failed and was left out"):
        assert main(["fit", *SETTINGS, *every_round, "--run_dir", str(run_dir)]) == 0
    first, second = json.loads((run_dir / "summary.json").read_text())["rounds"]
    assert first["failed"] == {"client_1": "RuntimeError: out of memory while scoring"}
    assert "eval_accuracy" not in first["parties"]["client_1"] and "eval_accuracy" in first["parties"]["client_0"]
    assert first["parties"]["client_1"]["task_loss"] is not None  # its training of the round stands
    assert second["failed"] == {} and "eval_accuracy" in second["parties"]["client_1"]  # back in round 2
