"""benchmarks/flower_overhead.py: message-to-phase latencies from a Flower run's timelines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flower_overhead.py"


def _module():
    spec = importlib.util.spec_from_file_location("flower_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_message_counts_once_and_phases_that_followed_in_it_do_not():
    timeline = [
        {"phase": "fine_tune", "sent": 100.0, "start": 100.75, "end": 110.0},
        {"phase": "share_knowledge", "start": 110.0, "end": 112.0},  # ran right after, in the same message
        {"phase": "distill", "sent": 120.0, "start": 122.5, "end": 130.0},
    ]
    summary = {
        "rounds": [
            {"round": 1, "parties": {"server": {"timeline": [{"phase": "distill", "start": 1.0, "end": 2.0}]}}},
            {"round": 2, "parties": {"client_0": {"timeline": timeline}}},
        ]
    }
    assert _module().message_latencies(summary) == [
        (0.75, "round 2 client_0 fine_tune"),
        (2.5, "round 2 client_0 distill"),
    ]
