"""`fit`: from a validated `RunConfig` to a finished federated run in `run_dir`."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
from filelock import FileLock, Timeout
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fedmkt.config import RunConfig, check_hardware, config_key, validate
from fedmkt.data.datamodule import PartyDataModule
from fedmkt.data.parts import PartyData, federation_data, party_data
from fedmkt.errors import FedMKTError, RunInterrupted
from fedmkt.federation.checkpoint import check_resumable, read_checkpoint
from fedmkt.federation.distributed import coordinate, is_rank_zero, launch_ranks, party_processes
from fedmkt.federation.participant import Participant
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.files import atomic_write_dir, atomic_write_text
from fedmkt.models import cache_root, load_model, load_tokenizer
from fedmkt.party_module import PartyModule

SERVER = "server"


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
            WandbLogger(
                project=config.logging.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=config.logging.wandb_offline,
            )
        )
    for logger in loggers:
        logger.log_hyperparams(asdict(config))
    return loggers


RUN_OUTPUTS = ("config.yaml", "summary.json", "checkpoint", "adapters", "tokenizers", "logs", "wandb")
"""What a run writes into its run_dir (`logs_resumed_N/` too); `--overwrite` removes exactly these."""

LOCK_FILE = "run.lock"
"""Held (an OS file lock, released even if the process is killed) while a run uses its run_dir."""


def _held_outputs(run_dir: Path) -> list[str]:
    """The run outputs already in `run_dir`, by name."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("logs_resumed_"))


def _launched_peer_rank() -> bool:
    """A ddp/fsdp rank > 0 re-running this command: rank 0 already owns and prepared the run_dir."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) > 0


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> FileLock:
    """Lock `run_dir` for this run and make sure it holds no other run's results.

    A second run on the same folder is refused while the first holds the lock; a folder holding a
    run is refused unless the run resumes it or `--overwrite` asks to replace it.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / LOCK_FILE))
        lock.acquire(timeout=0)
    except Timeout:
        raise FedMKTError(
            f"run_dir {run_dir} is in use by another fedmkt run (it holds {run_dir / LOCK_FILE}). "
            "Fix: wait for that run to finish, or give this one another --run_dir."
        ) from None
    except OSError as error:
        raise FedMKTError(
            f"cannot write to run_dir {run_dir} ({type(error).__name__}: {error.strerror or error}). "
            "Fix: choose a writable --run_dir, or fix the folder's permissions."
        ) from error
    held = _held_outputs(run_dir)
    if held and not resume and not overwrite:
        lock.release()
        raise FedMKTError(
            f"run_dir {run_dir} already holds a run ({', '.join(held)}). "
            f"Fix: continue it with --resume {run_dir}, replace it with --overwrite, or give another --run_dir."
        )
    if overwrite:
        for name in held:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def resume_state(config: RunConfig, resume: str) -> dict:
    """The checkpoint a `--resume` continues (checked against `config`)."""
    folder = Path(resume)
    if folder.exists() and not folder.is_dir():
        raise FedMKTError(f"--resume {resume} is a file, not a folder. Fix: pass the run_dir of the interrupted run.")
    if not folder.is_dir():
        raise FedMKTError(f"--resume folder {resume} does not exist. Fix: pass the run_dir of the interrupted run.")
    state = read_checkpoint(folder)
    check_resumable(state, config, folder)
    return state


def fit(
    config: RunConfig, resolved_config: Optional[str] = None, resume: Optional[str] = None, overwrite: bool = False
) -> dict:
    """Run FedMKT end to end; writes config.yaml, summary.json, adapters and logs to `run_dir`.

    With `resume`, `run_dir` becomes that folder and the run continues after its last complete
    round checkpoint, ending with the same results an uninterrupted run would have. Nothing is
    written into `run_dir` before the whole config has been checked and the folder locked.
    """
    if resume is not None and overwrite:
        raise FedMKTError("--resume and --overwrite contradict each other. Fix: give one of them.")
    if resume is not None:
        config.run_dir = str(resume)
    validate(config)
    check_hardware(config)  # in-process: every party runs on this machine
    data = federation_data(config, list(config.parties()))  # every source read and checked here
    validate_against_vocabularies(config)
    state = resume_state(config, resume) if resume is not None else None
    if state is not None and int(state["round"]) >= config.federation.rounds:
        print(
            f"fedmkt: {resume} already finished all {config.federation.rounds} rounds; nothing left to do "
            "(raise --federation.rounds to continue it further)."
        )
        return state["summary"]
    run_dir = Path(config.run_dir)
    lock = None if _launched_peer_rank() else claim_run_dir(run_dir, resume is not None, overwrite)
    try:
        return _fit_locked(config, run_dir, resolved_config, state, data)
    except RunInterrupted as interrupt:
        interrupt.run_dir = str(run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def _fit_locked(
    config: RunConfig, run_dir: Path, resolved_config: Optional[str], state: Optional[dict], data: dict[str, PartyData]
) -> dict:
    quiet_lightning()
    launch_ranks(config)  # ddp/fsdp parties: every rank runs from here on (see federation/distributed.py)
    if resolved_config is not None and state is None and is_rank_zero():
        atomic_write_text(run_dir / "config.yaml", resolved_config)
    server, clients = build_participants(config, data)
    if is_rank_zero():
        save_tokenizers(run_dir, {party.name: party.tokenizer for party in (server, *clients)})
    server, *clients = coordinate([server, *clients], [p.trainer for p in config.parties().values()])
    trainer = FederatedTrainer(server, clients, config, run_dir)
    return run_rounds(trainer, config, run_dir, state, report=is_rank_zero())


def save_tokenizers(run_dir: Path, tokenizers: dict[str, Any]) -> None:
    """Every party's tokenizer under run_dir/tokenizers: with the adapters, what reproduces a checkpoint."""
    for name, tokenizer in tokenizers.items():
        atomic_write_dir(run_dir / "tokenizers" / name, tokenizer.save_pretrained)


def run_rounds(
    trainer: FederatedTrainer, config: RunConfig, run_dir: Path, state: Optional[dict], report: bool = True
) -> dict:
    """The set-up and tear-down every backend shares around `trainer.fit`: continue after the
    checkpoint `state` (if any), log to the run's loggers, close them with the run's outcome, and
    print the results table. `report` is False on the ranks that do not write the run folder."""
    start_round = trainer.restore(state) if state is not None else 1
    trainer.loggers = make_loggers(config, run_dir, resumed=state is not None) if report else []
    status = "failed"
    try:
        summary = trainer.fit(start_round)
        status = "success"
    finally:
        for logger in trainer.loggers:
            logger.finalize(status)
        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
    if report:
        print("\n" + trainer.results_table())
        print(f"\nsummary: {run_dir / 'summary.json'}")
    return summary


def validate_against_vocabularies(config: RunConfig, unreadable: Optional[list[str]] = None) -> None:
    """Checks that need each party's tokenizer: `transfer.top_k` must fit every vocabulary.

    With `unreadable` (a list), a tokenizer this machine cannot load (a hub model out of reach, a
    path on another machine) is noted there and its check skipped, instead of stopping.
    """
    for name, party in config.parties().items():
        try:
            size = len(load_tokenizer(party.model, config.cache_dir))
        except FedMKTError as error:
            if unreadable is None:
                raise
            unreadable.append(f"{config_key(name)}'s tokenizer is not readable here ({error})")
            continue
        if config.transfer.top_k > size:
            raise FedMKTError(
                f"transfer.top_k={config.transfer.top_k} exceeds {config_key(name)}'s vocabulary of {size} tokens. "
                f"Fix: set transfer.top_k to at most {size} (e.g. 16)."
            )


def evaluate_party(config: RunConfig, party: str = SERVER, adapter: Optional[str] = None) -> dict:
    """Held-out scores of one party's base model, optionally with a saved LoRA adapter."""
    from peft import PeftModel

    from fedmkt.evaluation import evaluate_generation, evaluate_multiple_choice

    parties = config.parties()
    if party not in parties:
        raise FedMKTError(f"unknown party `{party}`. Fix: use one of {', '.join(parties)}.")
    spec = parties[party]
    data = party_data(config, party)
    model = load_model(spec.model, config.cache_dir, seed=config.seed + list(parties).index(party))
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FedMKTError(
                f"no LoRA adapter at {adapter}. Fix: pass a folder such as RUN_DIR/adapters/round_1/{party}."
            )
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (
            RuntimeError,
            ValueError,
            OSError,
            KeyError,
        ) as error:  # another party's adapter: size mismatch, unknown modules
            raise FedMKTError(
                f"adapter {adapter} does not fit {party}'s model ({type(error).__name__}: {' '.join(str(error).split())[:300]}). "
                f"Fix: pass {party}'s own adapter, e.g. RUN_DIR/adapters/round_1/{party}."
            ) from error
    tokenizer = load_tokenizer(spec.model, config.cache_dir)
    settings = {
        "batch_size": spec.eval_batch_size,
        "max_length": config.data.max_length,
        "progress": f"{party} · evaluate",
    }
    if data.format == "generation":
        return evaluate_generation(
            model, tokenizer, data.evaluation, max_new_tokens=config.data.max_new_tokens, **settings
        )
    return evaluate_multiple_choice(model, tokenizer, data.evaluation, **settings)


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
    tokenizer = load_tokenizer(party.model, config.cache_dir)
    peer_specs = {n: p.model for n, p in parties.items() if (n == SERVER) != (name == SERVER)}

    def build_module() -> PartyModule:
        L.seed_everything(config.seed + index, verbose=False)  # distinct, reproducible LoRA inits
        return PartyModule(
            load_model(party.model, config.cache_dir, seed=config.seed + index),
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
        config.seed,
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
        config.seed,
        phase_timeout_s=None if name == SERVER else config.federation.client_timeout_s,
        privacy=config.privacy,
        own_evaluation=data.own_evaluation,
        data_format=data.format,
        max_new_tokens=config.data.max_new_tokens,
    )
