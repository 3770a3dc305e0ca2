"""DualMinCE: which public samples a receiver distills, and from whom.

Per sample, the teacher is the candidate with the lowest loss (on the server: argmin over the
clients; on a client there is one candidate, the server). The sample is distilled only if that
teacher's loss is strictly lower than the receiver's own loss — knowledge flows only where the
teacher knows better. Everything else still trains with the task CE, with no KD term.

Every loss DualMinCE compares is over the text the receiver distills (`scored_targets`): the
answer under `transfer.kd_positions: answer`, prompt and answer under `all`, in nats per UTF-8
byte of that text (`scored_bytes`). A teacher therefore wins a sample only by predicting well
where it teaches, and a receiver verifies every position it distills (`fedmkt.received`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedmkt.data.tokenize import IGNORE_INDEX


def scored_targets(
    input_ids: torch.Tensor, targets: torch.Tensor, kd_positions: str, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The next-token labels a sample's score sums over, shaped like `input_ids` (``[L]`` or ``[B, L]``).

    `answer`: `targets` (the answer's tokens). `all`: every position's next token (the positions a
    receiver distills: all but the last real one); `attention_mask` marks right padding.
    """
    if kd_positions == "answer":
        return targets
    following = input_ids[..., 1:]
    if attention_mask is not None:
        following = torch.where(attention_mask[..., 1:].bool(), following, torch.full_like(following, IGNORE_INDEX))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = following
    return labels


def scored_bytes(prompt: str, answer: str, kd_positions: str) -> int:
    """UTF-8 bytes of the scored text: the unit every party's score is in, whatever its tokenizer."""
    answer_bytes = len(answer.encode("utf-8"))
    return answer_bytes if kd_positions == "answer" else answer_bytes + len(prompt.encode("utf-8"))


@dataclass
class Selection:
    """The outcome of selective transfer for one receiver in one round."""

    teachers: list[str]
    """Candidate teacher names, in a fixed order."""

    teacher_of_sample: torch.Tensor
    """[N] long: index into `teachers` of the sample's teacher, or -1 where nothing is distilled."""

    @property
    def num_selected(self) -> int:
        return int((self.teacher_of_sample >= 0).sum())

    def counts(self) -> dict[str, int]:
        """How many samples each teacher contributes."""
        return {name: int((self.teacher_of_sample == i).sum()) for i, name in enumerate(self.teachers)}


def best_teachers(teacher_losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N] long: per sample the index (into the sorted teacher names) of its lowest-loss teacher, -1
    where no teacher scored it; ties to the teacher listed first, as in `dual_min_ce`.

    On an unlabelled public set this is whose answer the receiver scores itself on before comparing.
    """
    names = sorted(teacher_losses)
    if not names:
        return torch.zeros(0, dtype=torch.long)
    best_loss, best = torch.stack([teacher_losses[name].float() for name in names]).min(dim=0)
    return torch.where(best_loss < float("inf"), best, torch.full_like(best, -1))


def dual_min_ce(
    own_losses: torch.Tensor, teacher_losses: dict[str, torch.Tensor], require_improvement: bool = True
) -> Selection:
    """Pick each sample's lowest-loss teacher and keep it only if it beats the receiver.

    `require_improvement=False` keeps every sample's best teacher (the "all" ablation).
    A teacher loss of +inf means that teacher did not score the sample; it is never chosen there.
    Ties go to the teacher listed first (stable, deterministic).
    """
    names = sorted(teacher_losses)
    if not names:
        return Selection([], torch.full_like(own_losses, -1, dtype=torch.long))
    stacked = torch.stack([teacher_losses[name].float() for name in names])  # [T, N]
    best_loss, best_teacher = stacked.min(dim=0)
    keep = best_loss < float("inf")  # +inf: no teacher scored the sample, so it has none (even in "all")
    if require_improvement:
        keep &= best_loss < own_losses.float()
    best_teacher = torch.where(keep, best_teacher, torch.full_like(best_teacher, -1))
    return Selection(names, best_teacher)
