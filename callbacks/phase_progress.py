"""Progress that says which party, phase and round it is counting: a bar on a terminal, lines in a log.

One `Trainer` per party per phase would otherwise print a row of anonymous `Epoch 0/0` bars.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from fedmkt.progress import LineProgress


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described as e.g. `client_0 · fine_tune · round 2 · epoch 1/1`."""

    def __init__(self, label: str) -> None:
        super().__init__(leave=False)
        self.label = label

    @property
    def predict_description(self) -> str:
        return self.label

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Lightning's postfix, with whole numbers (a phase's `selected`) as ints: `1200`, not tqdm's `1.2e+03`."""
        metrics = super().get_metrics(trainer, pl_module)
        return {key: int(v) if isinstance(v, float) and v.is_integer() else v for key, v in metrics.items()}

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(
            f"{self.label} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_description(self.label)


class PhaseLines(L.Callback):
    """A phase's progress as plain lines (`fedmkt.progress`), for output that is not a terminal:
    `client_0 · fine_tune · round 2: started, 75 batches`, a line every few seconds, then its seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._progress: Optional[LineProgress] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = int(trainer.num_training_batches) * int(trainer.max_epochs or 1)
        self._progress = LineProgress(total, self.label, unit="batches")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._progress = LineProgress(int(sum(trainer.num_predict_batches)), self.label, unit="batches")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._progress is not None:
            self._progress.update()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._progress is not None:
            self._progress.update()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
