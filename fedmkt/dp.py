"""DP-SGD for a client's private fine-tuning: the plan, Poisson batches, clipped and noised steps, epsilon.

Each optimizer step draws every private sample with probability q = batch_size / N (Poisson
sampling, Opacus's `UniformWithReplacementSampler`), computes each drawn sample's gradient of the
LoRA parameters on its own (one backward per sample), clips it to L2 norm C
(`privacy.dp.max_grad_norm`), sums, adds Gaussian noise of standard deviation sigma * C to every
coordinate, divides by the expected batch size and steps. Opacus's RDP accountant turns (sigma, q,
steps) into the (epsilon, delta) spent so far. The steps a run takes are fixed in advance (rounds x
epochs x 1/q), so epsilon after round r follows from r alone: nothing needs saving for a resume,
and a target epsilon fixes sigma before the first step. The noise and the sampling draw from the
operating system's entropy, never from the run's seed.

Only the private data is covered: the public data (distillation) is public, and the logits a
client shares come from a model whose only contact with its private data is these steps, so they
inherit the guarantee for that data (post-processing).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmkt.config import DPConfig

__all__ = ["DPPlan", "plan_dp", "epsilon_after", "poisson_batches", "private_step"]


@dataclass(frozen=True)
class DPPlan:
    """What one client's DP-SGD does every step, and how many steps a round takes."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    epochs_per_round: int
    delta: float
    num_samples: int

    @property
    def expected_batch_size(self) -> float:
        """q * N: what the summed gradient is divided by, whatever the batch drawn."""
        return self.sample_rate * self.num_samples


def plan_dp(dp: DPConfig, num_samples: int, batch_size: int, epochs_per_round: int, rounds: int) -> DPPlan:
    """The client's DP-SGD plan: q = batch_size / N, 1/q steps an epoch, sigma given or chosen for the target epsilon."""
    sample_rate = min(1.0, batch_size / max(num_samples, 1))
    steps_per_epoch = max(1, round(1 / sample_rate))
    sigma = dp.noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        total = rounds * epochs_per_round * steps_per_epoch
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            sigma = get_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                target_delta=dp.delta,
                sample_rate=sample_rate,
                steps=total,
                accountant="rdp",
            )
    return DPPlan(
        noise_multiplier=float(sigma),
        max_grad_norm=dp.max_grad_norm,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs_per_round=epochs_per_round,
        delta=dp.delta,
        num_samples=num_samples,
    )


def epsilon_after(plan: DPPlan, rounds_done: int) -> float:
    """The epsilon spent (at the plan's delta) once `rounds_done` rounds of private fine-tuning ran."""
    from opacus.accountants import RDPAccountant

    steps = rounds_done * plan.epochs_per_round * plan.steps_per_epoch
    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        return float(accountant.get_epsilon(plan.delta))


def _entropy_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def poisson_batches(num_samples: int, plan: DPPlan) -> object:
    """A batch sampler: `steps_per_epoch` batches, each sample in each with probability q (batches may be empty)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return UniformWithReplacementSampler(
        num_samples=num_samples,
        sample_rate=plan.sample_rate,
        generator=_entropy_generator(),
        steps=plan.steps_per_epoch,
    )


def private_step(
    params: list[Tensor], per_sample_losses: list[Callable[[], Tensor]], plan: DPPlan
) -> tuple[list[Tensor], list[float]]:
    """The DP-SGD gradient of `params` for one Poisson batch: (gradients, each sample's norm before clipping).

    `per_sample_losses` computes each drawn sample's loss (one at a time, so one sample's activations
    live at once). The sum of clipped gradients plus N(0, (sigma C)^2) noise, over the expected
    batch size q * N; an empty batch gives noise alone, as the accountant assumes.
    """
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for loss_of in per_sample_losses:
        grads = torch.autograd.grad(loss_of(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads))
        norms.append(norm)
        factor = min(1.0, plan.max_grad_norm / (norm + 1e-12))
        for acc, g in zip(total, grads):
            acc.add_(g.detach(), alpha=factor)
    generator = _entropy_generator()
    scale = plan.noise_multiplier * plan.max_grad_norm
    expected = max(plan.expected_batch_size, 1e-12)
    noised = []
    for acc in total:
        noise = torch.normal(0.0, scale, size=acc.shape, generator=generator).to(acc.device, acc.dtype)
        noised.append((acc + noise) / expected)
    return noised, norms
