"""The contract between the `FederatedTrainer` and a party: `FederatedParty` and `PhaseStats`.

The trainer runs the round protocol over anything that implements `FederatedParty`: an
in-process `Participant`, one coordinated across ranks (`distributed.RankCoordinatedParticipant`)
or a client on a Flower SuperNode (`flower.proxy.RemoteParticipant`). A training phase reports a
`PhaseStats`; summary.json stores its `to_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from fedmkt.payload import KnowledgePayload


@dataclass
class PhaseStats:
    """What a party's training phases report for one round (fine-tuning, distillation, or both)."""

    task_loss: float = math.nan
    """Mean task CE over the phase's batches; NaN when it did not train. In a client's round: its
    local fine-tuning's."""

    kd_loss: float = 0.0
    """Mean KD loss over the distilled positions (0: nothing distilled)."""

    train_seconds: float = 0.0
    """Wall time spent training."""

    ranks: Optional[int] = None
    """Processes the phase trained on (ddp/fsdp: > 1); None when it did not train."""

    sharded: bool = False
    """FSDP2: each rank held 1/ranks of the weights."""

    selected: int = 0
    """Distillation: public samples DualMinCE chose to distill."""

    teacher_counts: dict[str, int] = field(default_factory=dict)
    """Distillation: how many of those each teacher contributed."""

    distill_task_loss: Optional[float] = None
    """A client's round: the task CE of its distillation phase (None: no distillation followed)."""

    dp_epsilon: Optional[float] = None
    """A client's round under `privacy.dp`: the epsilon its private data has spent so far, every
    round up to this one (at `dp_delta`)."""

    dp_delta: Optional[float] = None
    """The delta of that guarantee."""

    callbacks: dict[str, float] = field(default_factory=dict)
    """What the distillation phase's callbacks measured: `selected` and `selected/<teacher>`
    (`SelectiveTransferCallback`), `alignment/hits`, `/misses`, `/samples`, `/seconds`,
    `/positions`, `/matched` (`AlignmentCacheCallback`). The run's loggers get them as
    `<party>/callbacks/<name>`."""

    def then(self, distill: PhaseStats) -> PhaseStats:
        """A client's round entry: this local fine-tuning followed by the distillation `distill`."""
        return PhaseStats(
            task_loss=self.task_loss,
            distill_task_loss=distill.task_loss,
            kd_loss=distill.kd_loss,
            selected=distill.selected,
            teacher_counts=distill.teacher_counts,
            train_seconds=self.train_seconds + distill.train_seconds,
            ranks=next((r for r in (distill.ranks, self.ranks) if r is not None), 1),
            sharded=self.sharded or distill.sharded,
            dp_epsilon=self.dp_epsilon,
            dp_delta=self.dp_delta,
            callbacks=dict(distill.callbacks),
        )

    def to_dict(self) -> dict[str, Any]:
        """The keys summary.json and the loggers record, in their order (absent ones left out)."""
        entry: dict[str, Any] = {"task_loss": self.task_loss}
        if self.distill_task_loss is not None:
            entry["distill_task_loss"] = self.distill_task_loss
        entry |= {
            "kd_loss": self.kd_loss,
            "selected": self.selected,
            "teacher_counts": dict(self.teacher_counts),
            "train_seconds": self.train_seconds,
        }
        if self.ranks is not None:
            entry["ranks"] = self.ranks
        if self.sharded:
            entry["sharded"] = True
        if self.dp_epsilon is not None:
            entry |= {"dp_epsilon": self.dp_epsilon, "dp_delta": self.dp_delta}
        if self.callbacks:
            entry["callbacks"] = dict(self.callbacks)
        return entry


@runtime_checkable
class FederatedParty(Protocol):
    """What `FederatedTrainer` calls on a server or client."""

    name: str
    """`server`, `client_0`, …: the name in payloads, logs and summary.json."""

    @property
    def num_public(self) -> int:
        """Samples in the public set (the same questions for every party)."""
        ...

    def fine_tune(self, round_index: int) -> PhaseStats:
        """Local training on the party's private data."""
        ...

    def share_knowledge(self, round_index: int) -> KnowledgePayload:
        """Per-sample CE and top-k logits on the public data."""
        ...

    def distill(self, round_index: int, teacher_payloads: dict[str, KnowledgePayload]) -> PhaseStats:
        """Select, align and distill from the teachers' payloads."""
        ...

    def evaluate(self) -> dict[str, Any]:
        """Scores on the held-out set(s) (`eval_*`, `own_eval_*`)."""
        ...

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (fedavg averages them)."""
        ...

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt LoRA weights (fedavg's average)."""
        ...

    def save_adapter(self, directory: Path) -> None:
        """Write the adapter of the current round's checkpoint."""
        ...

    def load_adapter(self, directory: Path) -> None:
        """Restore the adapter a checkpoint saved (resume)."""
        ...

    def cached_public_losses(self) -> Optional[torch.Tensor]:
        """The party's own public-data CE if still valid for its weights (checkpointed with them)."""
        ...

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        """Put back the losses a checkpoint saved."""
        ...
