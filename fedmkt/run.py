"""`fit`: from a validated `RunConfig` to a finished federated run in `run_dir`, on either backend.

The steps every backend shares live below this module: building parties
(`federation.parties`), the run folder and resuming (`federation.run_folder`), and running the
rounds (`federation.rounds`). `fit` dispatches on `federation.backend`: in-process here, or a
Flower run submitted to the SuperLink (`federation.flower.submit`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import yaml

from fedmkt.config import RunConfig, check_hardware, validate
from fedmkt.data.parts import SERVER, PartyData, federation_data, party_data
from fedmkt.errors import FedMKTError, RunInterrupted
from fedmkt.federation.checkpoint_record import finished_line
from fedmkt.federation.distributed import coordinate, is_rank_zero, launch_ranks
from fedmkt.federation.parties import build_participants, quiet_lightning, save_tokenizers
from fedmkt.federation.rounds import run_rounds
from fedmkt.federation.run_folder import claim_run_dir, launched_peer_rank, resume_state
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.files import atomic_write_text
from fedmkt.models import load_model, load_tokenizer
from fedmkt.vocabulary_sizes import validate_against_vocabularies


def fit(
    config: RunConfig, resolved_config: Optional[str] = None, resume: Optional[str] = None, overwrite: bool = False
) -> dict:
    """Run FedMKT end to end; writes config.yaml, summary.json, adapters and logs to `run_dir`.

    `federation.backend: flower` submits the run to the SuperLink in `config.flower` instead and
    returns its summary.

    With `resume`, `run_dir` becomes that folder and the run continues after its last complete
    round checkpoint, ending with the same results an uninterrupted run would have. Nothing is
    written into `run_dir` before the whole config has been checked and the folder locked.
    """
    if resume is not None and overwrite:
        raise FedMKTError("--resume and --overwrite contradict each other. Fix: give one of them.")
    if config.federation.backend == "flower":
        from fedmkt.federation.flower.submit import submit

        # The ServerApp starts in the SuperLink's folder: run_dir must not depend on this one.
        config.run_dir = str(Path(resume if resume is not None else config.run_dir).expanduser().resolve())
        text = resolved_config if resolved_config is not None else config_text(config)
        return submit(config, resolved_config=text, resume=resume is not None, overwrite=overwrite)
    if resume is not None:
        config.run_dir = str(resume)
    validate(config)
    check_hardware(config)  # in-process: every party runs on this machine
    data = federation_data(config, list(config.parties()))  # every source read and checked here
    validate_against_vocabularies(config)
    state = resume_state(config, resume) if resume is not None else None
    if state is not None and int(state["round"]) >= config.federation.rounds:
        print(finished_line(resume, config.federation.rounds))
        return state["summary"]
    run_dir = Path(config.run_dir)
    lock = None if launched_peer_rank() else claim_run_dir(run_dir, resume is not None, overwrite)
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


def evaluate_party(config: RunConfig, party: str = SERVER, adapter: Optional[str] = None) -> dict:
    """Held-out scores of one party's base model, optionally with a saved LoRA adapter, under
    summary.json's keys (`eval_accuracy`, ..., and `eval_<name>_*` per named held-out set)."""
    from fedmkt.evaluation import evaluate_generation, evaluate_multiple_choice, held_out_scores

    parties = config.parties()
    if party not in parties:
        raise FedMKTError(f"unknown party `{party}`. Fix: use one of {', '.join(parties)}.")
    spec = parties[party]
    data = party_data(config, party)
    model = load_model(spec.model, config.cache_dir, seed=config.seed + list(parties).index(party))
    if adapter is not None:
        from fedmkt.model_scoring import attach_adapter

        model = attach_adapter(model, adapter, party)
    tokenizer = load_tokenizer(spec.model, config.cache_dir)
    settings = {"batch_size": spec.eval_batch_size, "max_length": config.data.max_length}

    def score(examples: list, what: str) -> dict:
        if data.format == "generation":
            return evaluate_generation(
                model,
                tokenizer,
                examples,
                max_new_tokens=config.data.max_new_tokens,
                progress=f"{party} · {what}",
                **settings,
            )
        return evaluate_multiple_choice(model, tokenizer, examples, progress=f"{party} · {what}", **settings)

    return held_out_scores(score, data.evaluation, data.evaluation_sets)


def config_text(config: RunConfig) -> str:
    """A config as the YAML text `fedmkt fit --config` reads (how a script's config reaches a Flower run)."""
    return yaml.safe_dump(asdict(config), sort_keys=False)
