"""Running the rounds of a built federation: its loggers, resuming, and the results at the end.

Both backends end here: the in-process `fit` and the Flower ServerApp hand their
`FederatedTrainer` to `run_rounds`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fedmkt.config import RunConfig
from fedmkt.federation.trainer import FederatedTrainer


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
