"""How a distillation phase used the receiver's alignment cache, for the run's loggers."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L

from fedmkt.teacher_targets import AlignmentCacheStats, TeacherAligners


class AlignmentCacheCallback(L.Callback):
    """Reports the alignment behind a phase's targets: cache hits, misses (maps built), samples,
    seconds, positions and the positions matched one-to-one.

    The alignment runs before the phase's data is built (`Participant.distill`), so by the time
    this phase's fit starts every aligner it needs is loaded; the callback takes the record of that
    alignment (`TeacherAligners.last_alignment`) at fit start and logs it as `alignment/hits`,
    `alignment/misses`, `alignment/samples`, `alignment/seconds`, `alignment/positions` and
    `alignment/matched`: in `trainer.callback_metrics` at every step, and once to any logger the
    phase's trainer has; the participant returns `metrics` with the phase's stats, so the run's
    loggers record them as `<party>/callbacks/alignment/...` every round. Nothing of the
    phase is left to free afterwards: the aligners and the on-disk maps are kept for later rounds
    on purpose, and the aligned targets belong to the phase's data.
    """

    def __init__(self, aligners: TeacherAligners) -> None:
        self.aligners = aligners
        self.stats = AlignmentCacheStats()
        """The record of the alignment behind the phase that started last."""

    @property
    def metrics(self) -> dict[str, float]:
        """`stats` under the names they are logged as."""
        return {f"alignment/{name}": float(value) for name, value in asdict(self.stats).items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = self.aligners.last_alignment

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for name, value in self.metrics.items():
            pl_module.log(name, value, logger=False, on_step=True, on_epoch=False)
