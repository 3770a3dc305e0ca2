"""Re-index a teacher's top-k logits into the receiver's vocabulary, as tensors only.

This runs for every position of every public sample each round, so it is written as a handful of
batched tensor operations (gather, stable sort, scatter, masked softmax): no Python loop over
positions and no token strings.
"""

from __future__ import annotations

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


def align_topk(
    teacher_topk_ids: Tensor,
    teacher_topk_logits: Tensor,
    matched_teacher_pos: Tensor,
    vocab_map: Tensor,
    fallback_ids: Tensor,
    temperature: float = 1.0,
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

    Returns:
        ``(ids, probs)``, ``[Ls, k]`` long and float32. Matched rows keep the teacher's slot order;
        a slot whose mapped id is unmapped or repeats an earlier slot's id (first assignment wins)
        becomes id -1 with probability 0, and the softmax runs over the remaining slots. Unmatched
        rows are one-hot on the fallback id in slot 0; rows with neither are all -1 / 0.
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
    keep = has_match[:, None] & (mapped >= 0) & _first_occurrence(mapped)

    scaled = teacher_topk_logits[rows].float() / temperature
    scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=1)
    probs = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=device))
    ids = torch.where(keep, mapped, torch.full((), -1, dtype=torch.long, device=device))

    use_fallback = ~has_match & (fallback >= 0)
    ids[:, 0] = torch.where(use_fallback, fallback, ids[:, 0])
    probs[:, 0] = torch.where(use_fallback, torch.ones((), device=device), probs[:, 0])
    return ids, probs
