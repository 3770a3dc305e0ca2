"""Selective transfer (DualMinCE) as a Lightning callback."""

from __future__ import annotations

import lightning as L
import torch

from fedmkt.data.datamodule import DistillationDataModule
from fedmkt.selection import dual_min_ce


class SelectiveTransferCallback(L.Callback):
    """Decides, per public sample, whether and from which teacher the receiver distils.

    A teacher that did not score a sample (e.g. a client that failed) gets loss +inf there, so it is
    never chosen for it. `history` keeps one entry per distillation phase for the run summary.
    """

    def __init__(self, require_improvement: bool = True) -> None:
        self.require_improvement = require_improvement
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if not isinstance(data, DistillationDataModule):
            return
        teacher_losses = {}
        for name, payload in data.teacher_payloads.items():
            losses = torch.full((len(data.public),), float("inf"))
            losses[payload.sample_index.long()] = payload.losses.float()
            teacher_losses[name] = losses
        data.selection = dual_min_ce(data.own_losses, teacher_losses, self.require_improvement)
        self.history.append({"selected": data.selection.num_selected, "teacher_counts": data.selection.counts()})

    @property
    def last(self) -> dict:
        """Selection outcome of the most recent phase."""
        return self.history[-1] if self.history else {"selected": 0, "teacher_counts": {}}
