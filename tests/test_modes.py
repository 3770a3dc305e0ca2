"""Baseline modes (`federation.mode`) change which steps of a round run — checked on tiny runs."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from fedmkt.cli import main
from fedmkt.config import parse_run_config
from fedmkt.data.parts import party_data

QUICK = [
    "--federation.rounds",
    "1",
    "--federation.evaluate_before",
    "false",
    "--logging.wandb",
    "false",
    "--logging.csv",
    "false",
    "--data.pool_size",
    "12",
    "--data.eval_size",
    "4",
]


def run_mode(tmp_path, mode: str, *extra: str) -> tuple[dict, object]:
    run_dir = tmp_path / mode
    assert main(["fit", "--config", "tiny", "--run_dir", str(run_dir), "--federation.mode", mode, *QUICK, *extra]) == 0
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def adapter(run_dir, party: str) -> dict:
    return load_file(run_dir / "adapters" / "round_1" / party / "adapter_model.safetensors")


def lora_b_is_zero(weights: dict) -> bool:
    """peft initialises every lora_B to zero: an untrained adapter still has all-zero B matrices."""
    return all(bool((v == 0).all()) for k, v in weights.items() if "lora_B" in k)


def test_standalone_trains_clients_alone_and_moves_no_bytes(tmp_path):
    summary, run_dir = run_mode(tmp_path, "standalone")
    parties = summary["rounds"][0]["parties"]
    assert all(p["bytes_sent"] == 0 and p["bytes_received"] == 0 for p in parties.values())
    assert parties["client_0"]["task_loss"] > 0 and parties["server"]["task_loss"] is None
    assert lora_b_is_zero(adapter(run_dir, "server"))
    assert not lora_b_is_zero(adapter(run_dir, "client_0"))


def test_centralized_gives_the_server_the_public_and_every_private_part():
    """Centralized bounds what federating can give the server: it trains on every example there is."""
    arguments = ["--config", "tiny", "--data.pool_size", "12", "--data.eval_size", "4"]
    federated = parse_run_config(arguments)
    centralized = parse_run_config([*arguments, "--federation.mode", "centralized"])
    assert party_data(federated, "server").private == []

    def questions(examples):
        return sorted(repr(e) for e in examples)

    everything = party_data(federated, "server").public + [
        e for i in range(len(federated.clients)) for e in party_data(federated, f"client_{i}").private
    ]
    assert len(everything) == 12
    assert questions(party_data(centralized, "server").private) == questions(everything)


def test_centralized_trains_only_the_server_on_the_whole_pool(tmp_path):
    summary, run_dir = run_mode(tmp_path, "centralized")
    parties = summary["rounds"][0]["parties"]
    assert parties["server"]["task_loss"] > 0 and parties["client_0"]["task_loss"] is None
    assert not lora_b_is_zero(adapter(run_dir, "server"))
    assert lora_b_is_zero(adapter(run_dir, "client_0")) and lora_b_is_zero(adapter(run_dir, "client_1"))


def test_llm2slm_keeps_the_llm_frozen_and_transfers_one_way(tmp_path):
    summary, run_dir = run_mode(tmp_path, "llm2slm")
    # The server would distill for an epoch in fedmkt mode: what freezes it here is the mode alone.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["server"]["distill_epochs"] >= 1
    parties = summary["rounds"][0]["parties"]
    assert lora_b_is_zero(adapter(run_dir, "server"))
    assert parties["server"]["selected"] == 0 and parties["server"]["task_loss"] is None
    assert parties["server"]["bytes_received"] == 0 and parties["server"]["bytes_sent"] > 0
    assert parties["client_0"]["bytes_sent"] == 0 and parties["client_0"]["bytes_received"] > 0
    assert not lora_b_is_zero(adapter(run_dir, "client_0"))


@pytest.mark.slow
def test_fedavg_leaves_homogeneous_clients_with_one_averaged_adapter(tmp_path):
    summary, run_dir = run_mode(tmp_path, "fedavg")
    first, second = adapter(run_dir, "client_0"), adapter(run_dir, "client_1")
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)
    assert not lora_b_is_zero(first)
    fedmkt_summary, _ = run_mode(tmp_path, "fedmkt")
    # Adapter exchange costs bytes on top of the logits.
    assert (
        summary["rounds"][0]["parties"]["client_0"]["bytes_sent"]
        > fedmkt_summary["rounds"][0]["parties"]["client_0"]["bytes_sent"]
    )


def test_zero_shot_only_evaluates(tmp_path):
    run_dir = tmp_path / "zero_shot"
    args = [
        "fit",
        "--config",
        "tiny",
        "--run_dir",
        str(run_dir),
        "--federation.mode",
        "zero_shot",
        "--logging.wandb",
        "false",
        "--data.eval_size",
        "4",
    ]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == [] and set(summary["zero_shot"]) == {"server", "client_0", "client_1"}


def test_fedavg_rejects_heterogeneous_clients(tmp_path, capsys):
    code = main(
        [
            "fit",
            "--config",
            "tiny",
            "--run_dir",
            str(tmp_path / "bad"),
            "--federation.mode",
            "fedavg",
            *QUICK,
            "--clients.help" if False else "--data.max_length",
            "96",
            "--transfer.top_k",
            "4",
        ]
        + [
            "--clients",
            json.dumps(
                [
                    {
                        "model": {
                            "source": "embedded:smollm2-135m-instruct",
                            "random_init": {
                                "num_hidden_layers": 2,
                                "hidden_size": 64,
                                "intermediate_size": 128,
                                "num_attention_heads": 4,
                                "num_key_value_heads": 2,
                            },
                        }
                    },
                    {
                        "model": {
                            "source": "embedded:smollm2-135m-instruct",
                            "random_init": {
                                "num_hidden_layers": 1,
                                "hidden_size": 64,
                                "intermediate_size": 128,
                                "num_attention_heads": 4,
                                "num_key_value_heads": 2,
                            },
                        }
                    },
                ]
            ),
        ]
    )
    assert code == 2
    assert "identical architectures" in capsys.readouterr().err
