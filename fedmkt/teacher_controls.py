"""Control teachers that separate knowledge from format: the same payload with its ranking removed.

`transfer.teacher: hard` shares a party's real answer with flat top-k values; `random` an answer
drawn uniformly among the options with flat top-k values (the answer is drawn by the sharing party,
`random_answers`). What a student gains from such a teacher is what the public questions' format
and a pseudo-label give, not the teacher's soft knowledge.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import torch

from fedmkt.data.examples import QAExample
from fedmkt.data.tokenize import IGNORE_INDEX
from fedmkt.payload import KnowledgePayload

__all__ = ["flat_topk", "random_answers"]


def flat_topk(
    payload: KnowledgePayload, targets_of: Callable[[int], torch.Tensor], scored_bytes: torch.Tensor
) -> KnowledgePayload:
    """`payload` with each position's top-k values replaced by one value (no ranking).

    The value keeps the top-k's total probability (``T * (logsumexp(x / T) - log k)``), so under
    `topk_target: tail` the same mass lands on the same ids, spread evenly. That mass is capped at
    the whole vocabulary's (the float16 values may round it above) and the value rounded down to
    float16, so the flat top-k never claims more than the shared log-sum-exp allows: a receiver
    refuses a payload whose top-k outweighs it, and two round-ups (the sender's values, then the
    flat one) can add up to more than the rounding it allows for. The label
    log-probabilities and losses are those of this flat distribution (a label among the top-k gets
    the even share, any other keeps its own), so a receiver's checks pass it as any teacher;
    `targets_of(row)` gives the payload row's scored next-token targets in the sender's tokens
    (`fedmkt.selection.scored_targets`), `scored_bytes[row]` its scored text's bytes.
    """
    scaled = payload.topk_logits.float() / payload.temperature
    k = scaled.shape[1]
    mass = torch.minimum(torch.logsumexp(scaled, dim=1), payload.logsumexp.float())[:, None]  # at most all of it
    exact = payload.temperature * (mass - torch.log(torch.tensor(float(k))))
    level = exact.to(payload.topk_logits.dtype)
    lower = torch.nextafter(level, torch.full_like(level, float("-inf")))
    level = torch.where(level.float() > exact, lower, level)  # as sent, and never above the exact value
    even_share = level[:, 0].float() / payload.temperature - payload.logsumexp.float()
    label_logprob = payload.label_logprob.clone()
    losses = payload.losses.clone()
    for row in range(len(payload)):
        start, stop = int(payload.offsets[row]), int(payload.offsets[row + 1])
        targets = targets_of(row)
        labelled = targets != IGNORE_INDEX
        listed = (payload.topk_ids[start:stop].long() == targets[:, None]).any(dim=1) & labelled
        span = label_logprob[start:stop]
        span[listed] = even_share[start:stop][listed].to(span.dtype)
        losses[row] = -span[labelled].float().sum() / max(1, int(scored_bytes[row]))
    return replace(
        payload, topk_logits=level.expand_as(scaled).contiguous(), label_logprob=label_logprob, losses=losses
    )


def random_answers(examples: list[QAExample], seed: int) -> list[str]:
    """One option per question, drawn uniformly and reproducibly from `seed` (the random teacher's answers)."""
    draw = random.Random(seed)
    return [example.choices[draw.randrange(len(example.choices))] for example in examples]
