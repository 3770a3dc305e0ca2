"""End to end on the real embedded models: Gemma-3-270M server, two SmolLM2-135M clients, ARC-Easy.

Scaled down (one round, a few questions) so it fits the test suite, but everything is real:
pretrained weights from the GGUF files, real data, real cross-tokenizer alignment.
"""

from __future__ import annotations

import json
import math

import pytest

from fedmkt.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("real") / "run"
    args = [
        "fit", "--config", "demo", "--run_dir", str(run_dir),
        "--data.eval_size", "24", "--data.pool_size", "12", "--data.max_length", "96",
        "--federation.rounds", "1", "--logging.wandb", "false",
        "--server.trainer.enable_progress_bar", "false",
    ]
    assert main(args) == 0
    return json.loads((run_dir / "summary.json").read_text())


def test_pretrained_parties_beat_chance_before_training(real_run):
    # 4-way multiple choice: chance is 0.25; the pretrained models know some science.
    for party, scores in real_run["zero_shot"].items():
        assert scores["eval_accuracy"] > 0.3, party


def test_one_real_round_trains_and_exchanges_knowledge(real_run):
    parties = real_run["rounds"][0]["parties"]
    assert set(parties) == {"server", "client_0", "client_1"}
    for name, party in parties.items():
        assert math.isfinite(party["task_loss"]) and math.isfinite(party["kd_loss"]), name
        assert 0 <= party["selected"] <= 4
        assert party["bytes_sent"] > 0 and party["bytes_received"] > 0
    # Real pretrained models are confident on some answers: CE on answer tokens is far below ln(V).
    assert parties["server"]["task_loss"] < math.log(262_144) / 2
    # Where anything was distilled, the KD term is a real cross-entropy (> 0).
    for party in parties.values():
        assert (party["kd_loss"] > 0) == (party["selected"] > 0)
