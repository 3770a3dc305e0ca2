"""Building the parties of a run: each one's model, tokenizer, data and phases.

Every backend builds its parties here: in-process all of them, on a Flower node the one client it
serves (`build_participant` loads only that party's model and data), on the ServerApp the server.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L

from fedmkt.config import RunConfig, check_hardware, config_key
from fedmkt.data.datamodule import PartyDataModule
from fedmkt.data.parts import SERVER, PartyData, federation_data, party_data
from fedmkt.errors import FedMKTError
from fedmkt.federation.distributed import is_rank_zero, party_processes
from fedmkt.federation.participant import Participant
from fedmkt.federation.trainer import trained_phases
from fedmkt.files import atomic_write_dir
from fedmkt.models import cache_root, load_model, load_tokenizer
from fedmkt.party_module import PartyModule


def quiet_lightning() -> None:
    """One Trainer per party per phase would repeat Lightning's start-up banners dozens of times."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch.trainer.connectors.signal_connector",  # "Received SIGTERM": fedmkt reports the stop itself
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|LeafSpec|does not have many workers).*")


def build_participants(
    config: RunConfig, data: Optional[dict[str, PartyData]] = None
) -> tuple[Participant, list[Participant]]:
    """Load every party's data (all checked before any model loads, unless given), model and
    tokenizer, and wire up the participants; each receives only its own private examples."""
    names = list(config.parties())
    data = data if data is not None else federation_data(config, names)
    participants = [build_participant(config, name, data[name]) for name in names]
    return participants[0], participants[1:]


def build_participant(config: RunConfig, name: str, data: Optional[PartyData] = None) -> Participant:
    """One party: its model (seeded LoRA init), tokenizer, data and evaluation examples.

    Used for every party in-process, and alone where each party runs in its own process or machine
    (the Flower backend): it loads only this party's model, and its peers' tokenizers only when it
    first aligns with them.
    """
    from fedmkt.models import TokenizersOnDemand

    parties = config.parties()
    if name not in parties:
        raise FedMKTError(f"unknown party `{name}`. Fix: use one of {', '.join(parties)}.")
    check_hardware(config, [name])  # this party runs on this machine
    index = list(parties).index(name)
    party = parties[name]
    data = data if data is not None else party_data(config, name)  # read on this party's machine only
    tokenizer = load_tokenizer(party.model, config.cache_dir, key=f"{config_key(name)}.model.source")
    peer_specs = {n: p.model for n, p in parties.items() if (n == SERVER) != (name == SERVER)}

    def build_module() -> PartyModule:
        base = load_model(party.model, config.cache_dir, seed=config.seed + index)  # a random-init base: from `seed`
        L.seed_everything(config.train_seed + index, verbose=False)  # distinct, reproducible LoRA inits
        return PartyModule(
            base,
            party.lora,
            party.optimizer,
            config.transfer,
            name,
        )

    # A single-device party runs on rank 0 only; other ranks defer (and so never do) loading its model.
    module = build_module() if is_rank_zero() or party_processes(party.trainer) > 1 else build_module
    # The server's private part is empty, except in the centralized baseline (all clients' data).
    datamodule = PartyDataModule(
        name,
        data.private,
        data.public,
        tokenizer,
        config.data.max_length,
        party.batch_size,
        party.eval_batch_size,
        config.train_seed,
    )
    return Participant(
        name,
        party,
        config.transfer,
        module,
        tokenizer,
        datamodule,
        data.evaluation,
        TokenizersOnDemand(peer_specs, config.cache_dir),
        cache_root(config.cache_dir) / "vocab_maps",
        config.data.max_length,
        config.train_seed,
        phase_timeout_s=None if name == SERVER else config.federation.client_timeout_s,
        privacy=config.privacy,
        own_evaluation=data.own_evaluation,
        data_format=data.format,
        max_new_tokens=config.data.max_new_tokens,
        rounds=config.federation.rounds,
        public_gold=data.public_gold,
        evaluation_sets=data.evaluation_sets,
        trained_phases=trained_phases(config.federation.mode, name),
    )


def save_tokenizers(run_dir: Path, tokenizers: dict[str, Any]) -> None:
    """Every party's tokenizer under run_dir/tokenizers: with the adapters, what reproduces a checkpoint."""
    for name, tokenizer in tokenizers.items():
        atomic_write_dir(run_dir / "tokenizers" / name, tokenizer.save_pretrained)
