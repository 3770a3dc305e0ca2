"""The dense-target KD loss of the FedMKT reference implementation, to check `sparse_kd_loss` against.

`fedmkt.losses.sparse_kd_loss` never builds the ``[B, L, V]`` target this loss scatters its
top-k probabilities into; tests compare the two, and `benchmarks/kd_memory.py` measures the
memory the dense target costs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def dense_kd_loss_reference(
    logits: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    kind: Literal["ce", "kl"] = "ce",
) -> Tensor:
    """The reference implementation's dense-target KD loss per position, ``[B, L]``.

    Scatters the top-k probabilities into a dense ``[B, L, V]`` target; memory-hungry by design.
    """
    valid = target_ids >= 0
    ids = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long()
    probs = torch.where(valid, target_probs, torch.zeros_like(target_probs)).to(logits.dtype)
    target = torch.zeros_like(logits)
    # scatter_add so that the empty slots (prob 0, dummy id 0) cannot overwrite a real slot on id 0.
    target.scatter_add_(-1, ids, probs)
    scaled = logits if temperature == 1.0 else logits / temperature
    loss = -(target * torch.log_softmax(scaled, dim=-1)).sum(-1)
    if kind == "kl":
        loss = loss + torch.xlogy(target, target).sum(-1)
    return loss


def dense_tail_kd_loss_reference(
    logits: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    kind: Literal["ce", "kl"] = "ce",
) -> Tensor:
    """The KD of a teacher's top-k probabilities plus one class for the rest, on dense tensors, ``[B, L]``.

    The student's tail is the log-sum-exp of its logits with every listed id masked out (a dense
    ``[B, L, V]`` mask), the teacher's is what its probabilities leave of 1.
    """
    valid = target_ids >= 0
    ids = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long()
    probs = torch.where(valid, target_probs, torch.zeros_like(target_probs)).to(logits.dtype)
    scaled = logits / temperature
    logq = torch.log_softmax(scaled, dim=-1)
    listed = torch.zeros(logits.shape, dtype=logits.dtype).scatter_add_(-1, ids, valid.to(logits.dtype)) > 0
    tail_logq = torch.logsumexp(scaled.masked_fill(listed, float("-inf")), dim=-1) - torch.logsumexp(scaled, dim=-1)
    tail_p = torch.where(valid.any(-1), (1 - probs.sum(-1)).clamp_min(0), torch.zeros_like(probs[..., 0]))
    loss = -(probs * logq.gather(-1, ids)).sum(-1) - tail_p * tail_logq
    if kind == "kl":
        loss = loss + torch.xlogy(probs, probs).sum(-1) + torch.xlogy(tail_p, tail_p)
    return loss
