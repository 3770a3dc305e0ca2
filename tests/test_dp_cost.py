"""benchmarks/dp_cost.py: each DP row is compared with the no-DP row on the same questions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def dp_cost():
    sys.path.insert(0, str(BENCHMARKS))  # it shares kd_transfer's steps, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("dp_cost", BENCHMARKS / "dp_cost.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["dp_cost"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_each_dp_row_gets_its_difference_to_no_dp(dp_cost):
    def row(correct: str, epsilon=None) -> dict:
        return {
            "eval_accuracy": correct.count("1") / len(correct),
            "eval_accuracy_ci": [0.0, 1.0],
            "eval_correct": correct,
            "dp_epsilon": epsilon,
            "dp_delta": None if epsilon is None else 1e-5,
            "seconds": 1.0,
        }

    bench = dp_cost.Bench("quick", dp_cost.base_config("quick"), Path("unused"))
    rows = {"no_dp": row("1111100000"), "epsilon_8": row("1111000000", 7.99), "epsilon_1": row("1100000000", 0.99)}
    result = dp_cost.report(bench, 24, rows)
    assert result["n_eval"] == 10 and result["n_private"] == 24
    assert "diff_vs_no_dp" not in result["rows"]["no_dp"]
    assert result["rows"]["epsilon_8"]["diff_vs_no_dp"]["diff"] == pytest.approx(-0.1)
    assert result["rows"]["epsilon_1"]["diff_vs_no_dp"]["diff"] == pytest.approx(-0.3)
    lo, hi = result["rows"]["epsilon_1"]["diff_vs_no_dp"]["ci"]
    assert lo <= -0.3 <= hi
    assert "| epsilon 1 | 0.99 (1e-05) | 20.0 [0.0, 100.0] | -30.0" in dp_cost.table(result)


def test_the_benchmark_trains_one_client_for_one_round_on_its_private_part(dp_cost):
    config = dp_cost.base_config("full")
    assert len(config.clients) == 1 and config.federation.rounds == 1
    assert config.data.pool_size - config.data.public_size == dp_cost.SCALES["full"]["private_size"]
    assert not config.privacy.dp.enabled  # the baseline; DP rows switch it on
