"""A single-GPU party stays on its device between phases when it fits (the strategy and the rule; CPU-testable parts)."""

from __future__ import annotations

import lightning as L
import torch

from fedmkt.config import TrainerConfig, TransferConfig
from fedmkt.federation import distributed, participant

try:
    from test_federated_trainer import make_participant
except ImportError:  # tests/ imported as a package
    from tests.test_federated_trainer import make_participant


def test_only_a_single_gpu_party_gets_the_resident_strategy(monkeypatch):
    assert distributed.resident_device(TrainerConfig()) is None or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resident_device(TrainerConfig(devices=1)) == torch.device("cuda", 0)
    assert distributed.resident_device(TrainerConfig(devices=[2])) == torch.device("cuda", 2)
    assert distributed.resident_device(TrainerConfig(devices=2)) is None  # several devices: ddp/fsdp decide
    assert distributed.resident_device(TrainerConfig(strategy="ddp")) is None
    assert distributed.resident_device(TrainerConfig(accelerator="cpu")) is None


def test_a_party_stays_only_while_half_the_gpu_is_free(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (50 * gib, 80 * gib))
    assert participant.room_to_stay(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * gib, 80 * gib))
    assert not participant.room_to_stay(torch.device("cuda", 0))


def _phases(party, strategy, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    """Fine-tune and share on a fresh `strategy()` per phase (as `lightning_strategy` gives); returns
    the adapter and how often the module was moved to the CPU."""
    moves = []
    module = party.module
    real_cpu = module.cpu
    monkeypatch.setattr(module, "cpu", lambda: moves.append(1) or real_cpu())
    monkeypatch.setattr(participant, "lightning_strategy", lambda settings: strategy())
    monkeypatch.setattr(participant.Participant, "_park", lambda self: None)  # only Lightning's own moves count
    party.fine_tune(round_index=1)
    party.share_knowledge(round_index=1)
    return {k: v.clone() for k, v in party.adapter_state().items()}, len(moves)


def test_the_resident_strategy_keeps_the_model_and_changes_no_number(
    smollm2_tokenizer, make_tiny_llama, tmp_path, monkeypatch
):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    def run(strategy, folder):
        L.seed_everything(0)  # the same LoRA initialisation for both parties
        party = make_participant(
            "client_0", smollm2_tokenizer, make_tiny_llama, tmp_path / folder, 0, TransferConfig(top_k=3)
        )
        with monkeypatch.context() as patch:
            return _phases(party, strategy, patch)

    kept_adapter, kept_moves = run(lambda: distributed.resident_strategy(torch.device("cpu")), "a")
    plain_adapter, plain_moves = run(lambda: SingleDeviceStrategy(device=torch.device("cpu")), "b")
    assert kept_moves == 0 and plain_moves >= 2  # Lightning's teardown moves it after each phase; ours does not
    assert kept_adapter.keys() == plain_adapter.keys()
    for name in kept_adapter:
        assert torch.equal(kept_adapter[name], plain_adapter[name]), name
