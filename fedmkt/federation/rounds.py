"""Running the rounds of a built federation: its loggers, resuming, and the results at the end.

Both backends end here: the in-process `fit` and the Flower ServerApp hand their
`FederatedTrainer` to `run_rounds`.
"""

from __future__ import annotations

import csv
import os
import secrets
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fedmkt.config import RunConfig
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.files import atomic_write_text

WANDB_RUN_ID = "wandb/run_id"
"""Where a run keeps its W&B run id, so that a resumed run logs to the same W&B run."""


def make_loggers(config: RunConfig, run_dir: Path, resumed_at: Optional[int] = None) -> list[Logger]:
    """W&B (offline unless told otherwise; one run per federated run) and a CSV fallback.

    A run resumed at round `resumed_at` goes on in the same records: its CSV rows are appended to
    `logs/metrics.csv` after the rows of the rounds its checkpoint holds, and W&B resumes the run
    of the id the first sitting stored (`resume="allow"`).
    """
    loggers: list[Logger] = []
    if config.logging.csv:
        csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="logs")
        kept = _rows_before(run_dir / "logs" / "metrics.csv", resumed_at) if resumed_at is not None else []
        with warnings.catch_warnings():  # its "will be deleted" notice: the kept rows are written back
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = csv_logger.experiment  # its start empties metrics.csv
        if kept:
            writer.metrics = kept
            writer.save()
        loggers.append(csv_logger)
    if config.logging.wandb:
        import wandb

        if config.logging.wandb_offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(
            QuietWandbLogger(
                project=config.logging.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=config.logging.wandb_offline,
                id=_wandb_run_id(run_dir),
                resume="allow",
                settings=wandb.Settings(quiet=True),  # where the run is saved, not a page of sparklines at the end
            )
        )
    for logger in loggers:
        logger.log_hyperparams(asdict(config))
    return loggers


class QuietWandbLogger(WandbLogger):
    """Lightning's WandbLogger without the `anonymous` key it always hands `wandb.init`: wandb
    ignores that setting now and prints a warning for any value, on every default run."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)


def _rows_before(metrics: Path, round_index: int) -> list[dict]:
    """The rows of an earlier sitting's metrics.csv for the rounds before `round_index`."""
    if not metrics.is_file():
        return []
    with open(metrics, newline="") as file:
        rows = list(csv.DictReader(file))
    return [row for row in rows if row.get("round") in (None, "") or float(row["round"]) < round_index]


def _wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id: made on its first sitting, read on every later one."""
    path = run_dir / WANDB_RUN_ID
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    atomic_write_text(path, run_id + "\n")
    return run_id


def run_rounds(
    trainer: FederatedTrainer, config: RunConfig, run_dir: Path, state: Optional[dict], report: bool = True
) -> dict:
    """The set-up and tear-down every backend shares around `trainer.fit`: continue after the
    checkpoint `state` (if any), log to the run's loggers, close them with the run's outcome, and
    print the results table. `report` is False on the ranks that do not write the run folder."""
    start_round = trainer.restore(state) if state is not None else 1
    trainer.loggers = make_loggers(config, run_dir, start_round if state is not None else None) if report else []
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
