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
