"""benchmarks/round_speed.py: phase times from a round's timeline, agreement, and resuming."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "round_speed.py"


@pytest.fixture(scope="module")
def round_speed():
    spec = importlib.util.spec_from_file_location("round_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(correct: str, task_loss: float, spans: list[tuple[str, float, float]]) -> dict:
    timeline = [{"phase": phase, "start": start, "end": end} for phase, start, end in spans]
    party = {"eval_correct": correct, "task_loss": task_loss, "kd_loss": 0.5, "selected": 3, "timeline": timeline}
    return {"rounds": [{"wall_seconds": 10.0, "parties": {"server": party}}]}


def test_a_phase_run_twice_adds_up_and_other_spans_are_left_out(round_speed):
    spans = [("distill", 0.0, 2.0), ("upload", 2.0, 9.0), ("distill", 9.0, 10.5), ("evaluate", 11.0, 12.0)]
    seconds = round_speed.phase_seconds(summary("10", 1.0, spans))
    assert seconds == {("server", "distill"): 3.5, ("server", "evaluate"): 1.0}


def test_agreement_names_what_differs(round_speed):
    base = summary("1100", 1.0, [])
    assert round_speed.agreement(base, summary("1100", 1.0005, []), 1e-3) == (True, [])
    same, differences = round_speed.agreement(summary("1010", 1.1, []), base, 1e-3)
    assert not same
    assert differences == ["server: 2 of 4 questions answered differently", "server: task_loss 1.100000 vs 1.000000"]


def test_a_finished_round_is_reused_only_at_the_same_scale_and_paths(round_speed, tmp_path):
    scale, off = {"eval_size": 60, "part_size": 32}, ("chunked_head", "sorted_public")
    assert round_speed.finished_round(tmp_path, "plain", scale, off) is None
    recorded = summary("101", 2.0, [("evaluate", 0.0, 1.0)])
    round_speed.record_round(tmp_path, "plain", scale, off, recorded)
    assert round_speed.finished_round(tmp_path, "plain", scale, off) == recorded
    assert round_speed.finished_round(tmp_path, "fast", scale, off) is None
    assert round_speed.finished_round(tmp_path, "plain", scale, ("chunked_head",)) is None
    assert round_speed.finished_round(tmp_path, "plain", {"eval_size": 1000, "part_size": 300}, off) is None
