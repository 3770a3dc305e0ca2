"""One learning-rate schedule per party across the whole run (`optimizer.schedule: run`).

Each phase builds a fresh Lightning Trainer, so a schedule that lives in one `configure_optimizers`
restarts every phase: full rate after a warm-up of zero steps, three times over the same public
questions. Here the run's schedule (linear warm-up, then cosine decay to 0) is laid over the
party's planned training, measured in samples: every round gives its fine-tuning `private ×
local_epochs` samples and its distillation `public × distill_epochs`, in the order the party runs
them. A phase takes its planned span whatever number of steps it actually runs (an unlabelled
public set trains only the selected samples), its steps spread evenly over that span. A step's
position depends only on the round, the phase and the step's index, so a resumed run continues on
the same curve with no schedule state in its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ScheduleSpan", "run_span", "lr_factor", "phase_lr_lambda"]


@dataclass(frozen=True)
class ScheduleSpan:
    """Where one phase lies on its party's run schedule: `[start, start + length)` of `total` samples."""

    start: float
    length: float
    total: float


def run_span(phases: dict[str, float], phase: str, round_index: int, rounds: int) -> ScheduleSpan:
    """The span of `phase` in round `round_index` (from 1), given the samples each trained phase plans
    per round, in the order the party runs them (e.g. `{"fine_tune": 300, "distill": 150}`)."""
    per_round = sum(phases.values())
    before = sum(samples for name, samples in _preceding(phases, phase))
    return ScheduleSpan((round_index - 1) * per_round + before, phases[phase], rounds * per_round)


def _preceding(phases: dict[str, float], phase: str) -> list[tuple[str, float]]:
    names = list(phases)
    return [(name, phases[name]) for name in names[: names.index(phase)]]


def lr_factor(position: float, warmup_ratio: float) -> float:
    """The multiplier of the peak rate at `position` in [0, 1] of the run: linear warm-up over the
    first `warmup_ratio`, then a half cosine down to 0 at the end."""
    if position < warmup_ratio:
        return position / warmup_ratio
    progress = (position - warmup_ratio) / max(1e-12, 1.0 - warmup_ratio)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def phase_lr_lambda(span: ScheduleSpan, phase_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """`LambdaLR`'s factor for step `i` of a phase of `phase_steps` optimizer steps on `span`.

    Step `i` sits at the middle of its share of the span, so neither the run's first step (at the
    start of a warm-up) nor its last (at the end of the decay) runs at rate 0.
    """
    steps = max(1, phase_steps)

    def factor(step: int) -> float:
        position = span.start + span.length * (min(step, steps - 1) + 0.5) / steps
        return lr_factor(position / span.total, warmup_ratio)

    return factor
