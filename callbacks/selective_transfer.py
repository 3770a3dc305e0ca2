"""The selection counts of a distillation phase, for the progress bar and the run's loggers."""

from __future__ import annotations

import lightning as L

from fedmkt.selection import Selection


class SelectiveTransferCallback(L.Callback):
    """Logs how many public samples the phase distills, in all and per teacher.

    The `Selection` is computed by `Participant.distill` before the phase's data is built; this
    callback only reports it: `selected` on the progress bar, `selected/<teacher>` besides it in
    `trainer.callback_metrics` (both logged at every step, so the bar shows them from the first
    batch), and all of them once to any logger the phase's trainer has. `metrics` is what the
    participant returns with the phase's stats, which the run's loggers (W&B, metrics.csv) record
    as `<party>/callbacks/...` for every round.
    """

    def __init__(self, selection: Selection) -> None:
        self.metrics: dict[str, float] = {"selected": float(selection.num_selected)}
        self.metrics |= {f"selected/{teacher}": float(count) for teacher, count in selection.counts().items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for name, value in self.metrics.items():
            pl_module.log(name, value, prog_bar=name == "selected", logger=False, on_step=True, on_epoch=False)
