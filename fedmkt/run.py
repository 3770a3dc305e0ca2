"""`fit`: from a validated `RunConfig` to a finished federated run in `run_dir`."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fedmkt.config import RunConfig, validate
from fedmkt.data.datamodule import PartyDataModule
from fedmkt.data.tasks import FederatedSplit, load_task, split_task
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import assert_disjoint
from fedmkt.federation.checkpoint import atomic_write_text
from fedmkt.federation.distributed import coordinate, is_rank_zero, launch_ranks, party_processes
from fedmkt.federation.participant import Participant
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.models import cache_root, load_model, load_tokenizer
from fedmkt.party import PartyModule

SERVER = "server"


def quiet_lightning() -> None:
    """One Trainer per party per phase would repeat Lightning's start-up banners dozens of times."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|LeafSpec|does not have many workers).*")


def party_names(num_clients: int) -> list[str]:
    """`server`, `client_0`, …: the names used in payloads, logs and summary.json."""
    return [SERVER] + [f"client_{i}" for i in range(num_clients)]


def build_participants(config: RunConfig) -> tuple[Participant, list[Participant]]:
    """Load the task split, every party's model and tokenizer, and wire up the participants."""
    split = federated_split(config)
    participants = [build_participant(config, name, split) for name in party_names(len(config.clients))]
    return participants[0], participants[1:]


def federated_split(config: RunConfig) -> FederatedSplit:
    """The task cut into public, private and held-out parts, the same on every party's machine."""
    examples = load_task(config.data.task, config.data.data_dir)
    split = split_task(examples, len(config.clients), config.data.eval_size, config.data.pool_size, config.seed)
    assert_disjoint(split.evaluation, split.pool)
    return split


def make_loggers(config: RunConfig, run_dir: Path, resumed: bool = False) -> list[Logger]:
    """W&B (offline unless told otherwise; one run per federated run) and a CSV fallback.

    A resumed run logs its CSV next to the original's instead of overwriting it.
    """
    loggers: list[Logger] = []
    if config.logging.csv:
        version = "logs"
        while resumed and (run_dir / version).exists():
            version = f"logs_resumed_{len(list(run_dir.glob('logs*')))}"
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=version))
    if config.logging.wandb:
        if config.logging.wandb_offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(
            WandbLogger(project=config.logging.wandb_project, name=run_dir.name, save_dir=str(run_dir), offline=config.logging.wandb_offline)
        )
    for logger in loggers:
        logger.log_hyperparams(asdict(config))
    return loggers


def fit(config: RunConfig, resolved_config: Optional[str] = None, resume: Optional[str] = None) -> dict:
    """Run FedMKT end to end; writes config.yaml, summary.json, adapters and logs to `run_dir`.

    With `resume`, `run_dir` becomes that folder and the run continues after its last complete
    round checkpoint, ending with the same results an uninterrupted run would have.
    """
    if resume is not None:
        if not Path(resume).is_dir():
            raise FedMKTError(f"--resume folder {resume} does not exist. Fix: pass the run_dir of the interrupted run.")
        config.run_dir = str(resume)
    validate(config)
    quiet_lightning()
    launch_ranks(config)  # ddp/fsdp parties: every rank runs from here on (see federation/distributed.py)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resolved_config is not None and resume is None and is_rank_zero():
        atomic_write_text(run_dir / "config.yaml", resolved_config)
    server, clients = build_participants(config)
    if is_rank_zero():
        for party in (server, *clients):  # what's needed, with the adapters, to reproduce a checkpoint
            party.tokenizer.save_pretrained(run_dir / "tokenizers" / party.name)
    loggers = make_loggers(config, run_dir, resumed=resume is not None) if is_rank_zero() else []
    server, *clients = coordinate([server, *clients], [p.trainer for p in (config.server, *config.clients)])
    trainer = FederatedTrainer(server, clients, config, run_dir, loggers)
    start_round = trainer.restore() if resume is not None else 1
    try:
        summary = trainer.fit(start_round)
    finally:
        for logger in loggers:
            logger.finalize("success")
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()
    if is_rank_zero():
        print("\n" + trainer.results_table())
        print(f"\nsummary: {run_dir / 'summary.json'}")
    return summary


def evaluate_party(config: RunConfig, party: str = SERVER, adapter: Optional[str] = None) -> dict[str, float]:
    """Held-out accuracy of one party's base model, optionally with a saved LoRA adapter."""
    from peft import PeftModel

    from fedmkt.evaluation import evaluate_multiple_choice

    names = party_names(len(config.clients))
    if party not in names:
        raise FedMKTError(f"unknown party `{party}`. Fix: use one of {', '.join(names)}.")
    spec = dict(zip(names, [config.server, *config.clients]))[party]
    split = federated_split(config)
    model = load_model(spec.model, config.cache_dir, seed=config.seed + names.index(party))
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FedMKTError(f"no LoRA adapter at {adapter}. Fix: pass a folder such as RUN_DIR/adapters/round_1/{party}.")
        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = load_tokenizer(spec.model, config.cache_dir)
    return evaluate_multiple_choice(model, tokenizer, split.evaluation, batch_size=spec.eval_batch_size, max_length=config.data.max_length)


def build_participant(config: RunConfig, name: str, split: Optional[FederatedSplit] = None) -> Participant:
    """One party: its model (seeded LoRA init), tokenizer, data and evaluation questions.

    Used for every party in-process, and alone where each party runs in its own process or machine
    (the Flower backend): it loads only this party's model, and its peers' tokenizers only when it
    first aligns with them.
    """
    from fedmkt.models import TokenizersOnDemand

    names = party_names(len(config.clients))
    if name not in names:
        raise FedMKTError(f"unknown party `{name}`. Fix: use one of {', '.join(names)}.")
    index = names.index(name)
    party = [config.server, *config.clients][index]
    split = split if split is not None else federated_split(config)
    tokenizer = load_tokenizer(party.model, config.cache_dir)
    peer_specs = {n: p.model for n, p in zip(names, [config.server, *config.clients]) if (n == SERVER) != (name == SERVER)}

    def build_module() -> PartyModule:
        L.seed_everything(config.seed + index, verbose=False)  # distinct, reproducible LoRA inits
        return PartyModule(load_model(party.model, config.cache_dir, seed=config.seed + index), party.lora, party.optimizer, config.transfer, name)

    # A single-device party runs on rank 0 only; other ranks defer (and so never do) loading its model.
    module = build_module() if is_rank_zero() or party_processes(party.trainer) > 1 else build_module
    if name == SERVER:  # the server owns no private data, except in the centralized baseline
        private = split.pool if config.federation.mode == "centralized" else []
    else:
        private = split.private[index - 1]
    data = PartyDataModule(name, private, split.public, tokenizer, config.data.max_length, party.batch_size, party.eval_batch_size, config.seed)
    return Participant(
        name, party, config.transfer, module, tokenizer, data, split.evaluation, TokenizersOnDemand(peer_specs, config.cache_dir),
        cache_root(config.cache_dir) / "vocab_maps", config.data.max_length, config.seed,
        phase_timeout_s=None if name == SERVER else config.federation.client_timeout_s,
        privacy=config.privacy,
    )
