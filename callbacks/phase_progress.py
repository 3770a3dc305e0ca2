"""A progress bar that says which party, phase and round it is counting.

One `Trainer` per party per phase would otherwise print a row of anonymous `Epoch 0/0` bars.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


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
