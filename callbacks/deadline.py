"""A time limit on a party's phase, as a Lightning callback."""

from __future__ import annotations

import time

import lightning as L


class PhaseTimeout(RuntimeError):
    """A party's phase ran past its deadline."""


class PhaseDeadlineCallback(L.Callback):
    """Raises `PhaseTimeout` at the first batch boundary after `seconds` have passed.

    In-process parties cannot be pre-empted safely, so the check is cooperative: it fires between
    batches, never in the middle of an optimizer step.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline = float("inf")

    def _start(self) -> None:
        self._deadline = time.monotonic() + self.seconds

    def _check(self, trainer: L.Trainer) -> None:
        if time.monotonic() > self._deadline:
            raise PhaseTimeout(f"phase exceeded its {self.seconds:g} s limit")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer)
