"""The selection counts of a distillation phase, logged where Lightning logs go."""

from __future__ import annotations

import lightning as L

from fedmkt.selection import Selection


class SelectiveTransferCallback(L.Callback):
    """Logs how many public samples the phase distils, in all and per teacher.

    The `Selection` is computed by `Participant.distill` before the phase's data is built; this
    callback only reports it: `selected` on the progress bar, `selected/<teacher>` besides it in
    `trainer.callback_metrics` (both logged at every step, so the bar shows them from the first
    batch), and all of them once to each of the phase's loggers when training starts, so no
    logging interval can drop them.
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
