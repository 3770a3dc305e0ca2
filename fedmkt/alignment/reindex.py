"""Re-index a teacher's top-k logits into the receiver's vocabulary, as tensors only.

This runs for every position of every public sample each round, so it is written as a handful of
batched tensor operations (gather, stable sort, scatter, masked softmax): no Python loop over
positions and no token strings.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["align_topk"]


def _first_occurrence(ids: Tensor) -> Tensor:
    """Mask of slots whose id does not already appear in an earlier slot of the same row."""
    if ids.shape[1] <= 1:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    sorted_ids, perm = torch.sort(ids, dim=1, stable=True)
    first = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    first[:, 0] = True
    torch.ne(sorted_ids[:, 1:], sorted_ids[:, :-1], out=first[:, 1:])
    # A stable sort keeps equal ids in slot order, so the first of each run is the earliest slot;
    # `perm` is a permutation of every row, so the scatter writes every slot.
    return torch.empty_like(first).scatter_(1, perm, first)


def _sum_into_first_slot(probs: Tensor, ids: Tensor) -> Tensor:
    """Each slot's probability added to the earliest slot of its row with the same id."""
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [L, k, k]: slot a and slot b hold one id
    first_slot = same.to(torch.int8).argmax(dim=2)  # earliest b with ids[b] == ids[a]
    return torch.zeros_like(probs).scatter_add_(1, first_slot, probs)


def align_topk(
    teacher_topk_ids: Tensor,
    teacher_topk_logits: Tensor,
    matched_teacher_pos: Tensor,
    vocab_map: Tensor,
    fallback_ids: Tensor,
    temperature: float = 1.0,
    teacher_logsumexp: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Receiver-side top-k ids and probabilities for each receiver position.

    Args:
        teacher_topk_ids: ``[Lt, k]`` long, the teacher's top-k token ids per teacher position.
        teacher_topk_logits: ``[Lt, k]`` float, their logits.
        matched_teacher_pos: ``[Ls]`` long, the teacher position matched one-to-one to each
            receiver position, -1 for none.
        vocab_map: ``[Vt]`` long, teacher id -> receiver id, -1 where unmapped. Teacher ids outside
            ``[0, Vt)`` count as unmapped.
        fallback_ids: ``[Ls]`` long, the receiver token to put all mass on where there is no match
            (-1: leave the row empty).
        temperature: logits are divided by it before the softmax.
        teacher_logsumexp: ``[Lt]``, the teacher's log-sum-exp over its whole vocabulary at
            `temperature` per teacher position; given, the probabilities are the teacher's true
            ones (``transfer.topk_target: tail``) instead of a softmax over the k values.

    Returns:
        ``(ids, probs)``, ``[Ls, k]`` long and float32. Matched rows keep the teacher's slot order;
        a slot whose mapped id is unmapped or repeats an earlier slot's id becomes id -1 with
        probability 0. Without `teacher_logsumexp` the first assignment of an id wins and the
        softmax runs over the remaining slots (the reference's rule). With it, a repeated id's
        probability is added to its first slot (the teacher's mass on every token that maps
        there), an unmapped id's mass is left out, and a row sums to at most 1: what it leaves is
        the tail the loss matches. Unmatched rows are one-hot on the fallback id in slot 0; rows
        with neither are all -1 / 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = teacher_topk_ids.shape[1]
    length = matched_teacher_pos.shape[0]
    device = teacher_topk_ids.device
    matched = matched_teacher_pos.to(device=device, dtype=torch.long)
    fallback = fallback_ids.to(device=device, dtype=torch.long)
    vocab_map = vocab_map.to(device=device, dtype=torch.long)
    if length == 0 or k == 0:
        return (
            torch.full((length, k), -1, dtype=torch.long, device=device),
            torch.zeros((length, k), dtype=torch.float32, device=device),
        )

    has_match = matched >= 0
    rows = matched.clamp(min=0)
    if teacher_topk_ids.shape[0] == 0:
        has_match = torch.zeros_like(has_match)
        rows = torch.zeros_like(rows)
        teacher_topk_ids = torch.zeros((1, k), dtype=torch.long, device=device)
        teacher_topk_logits = torch.zeros((1, k), dtype=torch.float32, device=device)
    src_ids = teacher_topk_ids[rows].long()
    vocab_size = vocab_map.shape[0]
    if vocab_size == 0:
        mapped = torch.full_like(src_ids, -1)
    else:
        in_vocab = (src_ids >= 0) & (src_ids < vocab_size)
        mapped = torch.where(in_vocab, vocab_map[src_ids.clamp(0, vocab_size - 1)], -1)
    first = _first_occurrence(mapped)
    keep = has_match[:, None] & (mapped >= 0) & first

    scaled = teacher_topk_logits[rows].float() / temperature
    if teacher_logsumexp is None:
        scaled = scaled.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scaled, dim=1)
    else:
        lse = teacher_logsumexp.to(device=device, dtype=torch.float32)
        lse = lse[rows] if lse.numel() else torch.zeros(length, device=device)
        true_probs = (scaled - lse[:, None]).exp()
        # Sent logits and log-sum-exp may disagree by rounding (fp16 values): never above 1 in all.
        true_probs = true_probs / true_probs.sum(dim=1, keepdim=True).clamp(min=1.0)
        mapped_ok = has_match[:, None] & (mapped >= 0)
        probs = _sum_into_first_slot(torch.where(mapped_ok, true_probs, 0.0), mapped)
    probs = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=device))
    ids = torch.where(keep, mapped, torch.full((), -1, dtype=torch.long, device=device))

    use_fallback = ~has_match & (fallback >= 0)
    ids[:, 0] = torch.where(use_fallback, fallback, ids[:, 0])
    probs[:, 0] = torch.where(use_fallback, torch.ones((), device=device), probs[:, 0])
    return ids, probs
