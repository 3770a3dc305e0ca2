"""benchmarks/per_byte_selection.py: both rules read the same losses, and the per-byte one is the run's own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "per_byte_selection.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("per_byte_selection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["per_byte_selection"] = module
    spec.loader.exec_module(module)
    return module


def test_tokens_per_byte_counts_the_scored_tokens(script, smollm2_tokenizer):
    from fedmkt.data.examples import QAExample

    prompt = "Question: 2 + 2?\nAnswer:"
    example = QAExample("q", prompt, (" four", " five"), 0)
    tokens = len(smollm2_tokenizer(" four", add_special_tokens=False)["input_ids"])
    assert float(script.tokens_per_byte(smollm2_tokenizer, [example], 64, "answer")[0]) == pytest.approx(tokens / 5)
    # every token but the first is predicted (SmolLM2 adds no BOS), per byte of prompt and answer
    every = len(smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]) + tokens - 1
    ratio = float(script.tokens_per_byte(smollm2_tokenizer, [example], 64, "all")[0])
    assert ratio == pytest.approx(every / (len(prompt) + 5))


def test_the_per_byte_counts_are_the_runs_selections(script, tmp_path, monkeypatch, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "counts.json"
    monkeypatch.setattr(sys, "argv", ["per_byte_selection.py"])
    argv = ["--config", "tiny", "--run-dir", str(run_dir), "--out", str(out)]
    assert script.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(rows) == 3 * len(summary["rounds"])  # the server and two clients, every round
    for row in rows:
        recorded = summary["rounds"][row["round"] - 1]["parties"][row["receiver"]]["selected"]
        assert row["selected_per_byte"] == recorded
        assert 0 <= row["changed"] <= row["samples"]
    assert "selections that differ" in capsys.readouterr().out
