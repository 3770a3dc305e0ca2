"""Optional noise on the logits a party shares (`privacy.logit_noise`).

Each shared position's top-k logits are centred on their maximum, clipped to an L2 norm of
`logit_clip` (bounding any single position's contribution), and perturbed with Gaussian noise of
standard deviation `logit_noise`. This blurs what the logits reveal about a party's weights; it is
NOT a formal differential-privacy guarantee — no privacy accountant tracks the spent budget.
The true log-sum-exp over the vocabulary is not shared then (it would reveal the logits' scale
before clipping): the payload's `logsumexp` becomes that of the noised top-k values, so a
receiver sees no mass outside the k ids. Nor are the un-noised losses and label log-probabilities
(they would reveal what the noise hides): both are sent as zeros, and a receiver ranks the sender
by the loss it derives from the noised distribution itself (`fedmkt.received`).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Optional

import torch

from fedmkt.config import PrivacyConfig
from fedmkt.payload import KnowledgePayload


def add_logit_noise(
    payload: KnowledgePayload, privacy: PrivacyConfig, generator: Optional[torch.Generator] = None
) -> KnowledgePayload:
    """A copy of `payload` whose top-k logits are clipped and noised (ids unchanged; losses and
    label log-probabilities withheld as zeros).

    Its `logsumexp` is that of the noised values (no tail mass), for the reason the module gives.
    The noise comes from the operating system's entropy unless a `generator` is given (tests): a
    seed derived from the run config would let every receiver, who holds that config, regenerate
    the noise and subtract it.
    """
    if privacy.logit_noise <= 0:
        return payload
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    logits = payload.topk_logits.float()
    centred = logits - logits.max(dim=-1, keepdim=True).values
    norms = centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    clipped = centred * (privacy.logit_clip / norms).clamp(max=1.0)
    noisy = clipped + privacy.logit_noise * torch.randn(clipped.shape, generator=generator)
    shared = noisy.to(payload.topk_logits.dtype)
    logsumexp = torch.logsumexp(shared.float() / payload.temperature, dim=-1)
    return replace(
        payload,
        topk_logits=shared,
        logsumexp=logsumexp,
        losses=torch.zeros_like(payload.losses),
        label_logprob=torch.zeros_like(payload.label_logprob),
    )
