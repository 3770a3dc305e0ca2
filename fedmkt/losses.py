"""Task cross-entropy and sparse top-k knowledge distillation.

FedMKT distils from teachers that only ever send their top-k (token id, probability) pairs per
position. The reference implementation scatters those pairs into a dense ``[batch, length, vocab]``
target (about 1 GiB per teacher per 4x512 batch at a 262k vocabulary) and then builds a full
``log_softmax`` and a full product on top of it. Here the loss works on the k pairs directly:

* forward: for each chunk of positions, the row ``logsumexp(logits / T)`` (one chunk-sized fp32
  temporary at a time) and a gather of the k target logits. Only ``[B, L]`` and ``[B, L, k]``
  tensors are kept for backward, plus a reference to the logits (no copy).
* backward: the exact gradient ``(softmax(x / T) * sum(p) - scatter(p)) / T * grad_out``,
  recomputed chunk by chunk and written straight into one gradient tensor.

So the only ``[B, L, V]`` tensor the loss adds is the gradient that autograd needs anyway, and even
that can be avoided with ``inplace_grad=True`` (the gradient then overwrites the logits' storage).
Each call that needs a gradient allocates its own one: CE and KD on the same logits produce two
gradient-sized tensors that autograd then sums (``inplace_grad`` cannot be used there, since the
other loss still needs the logits).

Conventions: ``targets[b, i]`` / ``target_ids[b, i]`` are the targets of ``logits[b, i]`` (already
shifted); ``-100`` marks an ignored label, ``-1`` an empty top-k slot.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "EMPTY_SLOT",
    "DEFAULT_CHUNK_SIZE",
    "token_cross_entropy",
    "sparse_kd_loss",
    "kd_objective",
]

IGNORE_INDEX = -100
EMPTY_SLOT = -1
# Positions per chunk. At V = 262,144 one fp32 chunk row is 1 MiB, so a chunk temporary is 64 MiB;
# large enough that per-chunk overhead is negligible, small enough to be noise next to [B, L, V].
DEFAULT_CHUNK_SIZE = 64


def _chunk_scaled_logsumexp(rows: Tensor, temperature: float) -> Tensor:
    """``logsumexp(rows / T)`` of a ``[n, V]`` chunk in >= fp32, using one chunk-sized temporary."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    row_max = rows.amax(dim=-1, keepdim=True).to(acc)
    # A row that is entirely -inf (or +inf) would make ``rows - max`` NaN; shift by 0 instead,
    # as torch.logsumexp does, so the result is the honest -inf/+inf rather than NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # (rows - max) / T in one pass, promoted to fp32 for bf16/fp16 rows.
    shifted = torch.add(row_max / -temperature, rows, alpha=1.0 / temperature)
    lse = shifted.exp_().sum(dim=-1).log_()
    return lse + row_max.squeeze(-1) / temperature


def _validate(logits: Tensor, target_ids: Tensor, target_probs: Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {tuple(logits.shape)}")
    if target_ids.dim() != 3 or target_ids.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"target_ids must be [B, L, k] matching logits {tuple(logits.shape[:2])}, got {tuple(target_ids.shape)}"
        )
    if target_probs.shape != target_ids.shape:
        raise ValueError(
            f"target_probs shape {tuple(target_probs.shape)} != target_ids shape {tuple(target_ids.shape)}"
        )
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _row_ranges(batch: int, length: int, chunk_size: int, flat: bool):
    """Chunks ``[start, stop)`` of flattened position indices, in row-major order.

    When the logits cannot be viewed as ``[B*L, V]`` without a copy (e.g. a ``logits[:, :-1]``
    slice), chunks never straddle two samples, so every chunk is a view of the logits.
    """
    if flat:
        total = batch * length
        for start in range(0, total, chunk_size):
            yield start, min(start + chunk_size, total)
    else:
        for b in range(batch):
            for start in range(0, length, chunk_size):
                yield b * length + start, b * length + min(start + chunk_size, length)


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    """The ``[stop - start, V]`` view of flattened positions ``[start, stop)`` of a 3-D tensor."""
    length = t.shape[1]
    b = start // length
    if (stop - 1) // length == b:
        return t[b, start - b * length : stop - b * length]
    return t.view(-1, t.shape[-1])[start:stop]


def _can_flatten(t: Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return True


class _SparseSoftTargetCE(torch.autograd.Function):
    """Per-row ``-sum_j p_j * log_softmax(x / T)[id_j]`` (+ ``sum_j p_j log p_j`` for KL).

    Logits ``[B, L, V]`` (any strides; never copied), ids/probs/valid ``[N = B*L, k]`` contiguous,
    empty slots already given probability 0 and a valid (clamped) id. Returns ``[N]`` in fp32 (fp64 for fp64 logits).
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        ids: Tensor,
        probs: Tensor,
        valid: Tensor,
        temperature: float,
        kl: bool,
        chunk_size: int,
        inplace_grad: bool,
    ) -> Tensor:
        batch, length, _ = logits.shape
        flat = _can_flatten(logits)
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(batch * length, dtype=acc, device=logits.device)
        for start, stop in _row_ranges(batch, length, chunk_size, flat):
            lse[start:stop] = _chunk_scaled_logsumexp(_rows(logits, start, stop), temperature)
        # log q(id_j) for every slot; empty slots are masked out below, never multiplied (so an
        # infinite logit at the clamped dummy id cannot turn into 0 * inf = NaN).
        probs = probs.to(acc)
        k = ids.shape[1]
        gathered = logits.gather(2, ids.view(batch, length, k)).view(batch * length, k)
        target_logp = gathered.to(acc).div_(temperature).sub_(lse.unsqueeze(1))
        weighted = torch.where(valid, probs * target_logp, torch.zeros_like(target_logp))
        loss = 0.0 - weighted.sum(dim=1)  # +0.0, not -0.0, on empty rows
        if kl:
            loss = loss + torch.xlogy(probs, probs).sum(dim=1)
        ctx.save_for_backward(logits, ids, probs, valid, lse, target_logp)
        ctx.temperature = temperature
        ctx.kl = kl
        ctx.chunk_size = chunk_size
        ctx.inplace_grad = inplace_grad
        ctx.flat = flat
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, ids, probs, valid, lse, target_logp = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logits = grad_probs = None

        if ctx.needs_input_grad[0]:
            grad_loss = grad_loss.to(lse.dtype)
            prob_mass = probs.sum(dim=1)  # sum_j p_j per row
            softmax_scale = prob_mass * grad_loss / temperature  # [N]
            scatter_vals = -(probs * (grad_loss / temperature).unsqueeze(1))  # [N, k]
            if ctx.inplace_grad:
                # Overwrite the logits' own storage, chunk by chunk. A fresh alias (not the
                # saved tensor itself) so that AccumulateGrad can adopt it without a copy.
                grad_logits = logits.detach()
            else:
                grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
            direct = logits.dtype in (torch.float32, torch.float64)
            batch, length, _ = logits.shape
            for start, stop in _row_ranges(batch, length, chunk_size, ctx.flat):
                rows = _rows(logits, start, stop)
                out = _rows(grad_logits, start, stop)
                neg_lse = lse[start:stop].neg().unsqueeze(1)
                if direct:
                    # Work directly in the output slice (x / T - lse in one pass): no temporary.
                    work = torch.add(neg_lse, rows, alpha=1.0 / temperature, out=out)
                else:
                    work = torch.add(neg_lse, rows, alpha=1.0 / temperature)  # fp32 chunk
                work.exp_()
                work.mul_(softmax_scale[start:stop].unsqueeze(1))
                # scatter_add (not scatter) so that the gradient matches the loss, which sums
                # over slots; empty slots carry 0 and add nothing to their dummy id.
                work.scatter_add_(1, ids[start:stop], scatter_vals[start:stop])
                if work is not out:
                    out.copy_(work)
                del work

        if ctx.needs_input_grad[2]:
            # d/dp_j of -p_j log q_j (+ p_j log p_j) ; zero on empty slots.
            g = -target_logp
            if ctx.kl:
                g = g + torch.where(probs > 0, torch.log(probs) + 1, torch.zeros_like(probs))
            g = torch.where(valid, g, torch.zeros_like(g))
            grad_probs = g * grad_loss.to(g.dtype).unsqueeze(1)

        return grad_logits, None, grad_probs, None, None, None, None, None


def sparse_kd_loss(
    logits: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    kind: Literal["ce", "kl"] = "ce",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    inplace_grad: bool = False,
) -> Tensor:
    """Per-position KD loss against a top-k teacher distribution, without a dense target.

    ``kind="ce"``: ``-sum_slots p * log_softmax(logits / T)[id]`` (soft-target cross-entropy);
    ``kind="kl"``: the same minus the target entropy, i.e. ``KL(p || softmax(logits / T))``.
    Slots with id ``-1`` are empty; a position with no non-empty slot gets loss 0 and gradient 0.
    Duplicate ids within a position are summed (the dense reference would keep only one of them).
    The result is ``[B, L]`` in fp32 (fp64 for fp64 logits); masking and normalisation are the caller's (see
    :func:`kd_objective`). ``chunk_size`` positions are processed at a time.

    ``inplace_grad=True`` writes the gradient into the logits' own storage, so the loss adds no
    ``[B, L, V]`` tensor at all. Only use it when this loss is the last user of ``logits`` in the
    backward pass (e.g. logits straight out of an ``lm_head`` matmul used by nothing else): the
    logits' values are destroyed; another autograd node that saved ``logits`` will raise
    autograd's "modified by an inplace operation" error instead of silently using wrong values.
    """
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    _validate(logits, target_ids, target_probs, temperature, chunk_size)
    batch, length, vocab = logits.shape
    k = target_ids.shape[-1]
    flat_ids = target_ids.reshape(batch * length, k).long()
    valid = flat_ids >= 0
    if bool((flat_ids >= vocab).any()):
        raise ValueError(f"target_ids contain ids >= vocab size {vocab}")
    flat_ids = torch.where(valid, flat_ids, torch.zeros_like(flat_ids))
    flat_probs = target_probs.reshape(batch * length, k)
    flat_probs = torch.where(valid, flat_probs, torch.zeros_like(flat_probs))
    loss = _SparseSoftTargetCE.apply(
        logits, flat_ids, flat_probs, valid, float(temperature), kind == "kl", int(chunk_size), bool(inplace_grad)
    )
    return loss.view(batch, length)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Per-sample token-mean CE over non-ignored (``!= -100``) positions; 0 for a sample with none.

    This is both the task loss and the ``l_i`` that DualMinCE compares across parties, so it is
    exact (``logsumexp - target logit``, in fp32 per chunk) and never materialises a full fp32
    ``log_softmax`` of the logits: bf16 logits under ``torch.no_grad`` cost one fp32 chunk at a time.
    It is the sparse loss with one slot of probability 1 at the label.
    """
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be logits' [B, L] {tuple(logits.shape[:2])}")
    keep = targets != IGNORE_INDEX
    if bool(((targets < 0) & keep).any()):
        raise ValueError(f"targets must be >= 0 or {IGNORE_INDEX}")
    ids = torch.where(keep, targets, torch.full_like(targets, EMPTY_SLOT)).long().unsqueeze(-1)
    probs = keep.to(torch.float32).unsqueeze(-1)
    per_position = sparse_kd_loss(logits, ids, probs, 1.0, "ce", chunk_size)
    counts = keep.sum(dim=1)
    return per_position.sum(dim=1) / counts.clamp(min=1).to(per_position.dtype)


def kd_objective(
    ce_per_sample: Tensor,
    kd_per_position: Tensor,
    kd_mask: Tensor,
    ce_weight: float,
    kd_eligible: Tensor | None = None,
) -> Tensor:
    """FedMKT's ``lambda * CE + (1 - lambda) * KD`` as one scalar.

    Normalisation: ``CE = mean_b ce_per_sample[b]`` (each entry already a token mean), and
    ``KD = sum(kd_per_position[kd_mask]) / count(kd_eligible)``: the distilled positions' losses
    divided by every position that *could* be distilled (non-pad, has a next token, and in
    ``kd_positions=answer`` mode has a label), selected by DualMinCE or not, as the reference
    implementation does. So a distilled token's weight does not grow when its batch-mates are
    not selected, and the effective lambda does not drift from batch to batch with how many
    samples DualMinCE kept; a batch with no selected sample has KD 0. ``kd_eligible=None`` divides
    by ``count(kd_mask)`` instead (a mean over the distilled positions only). Masked-out entries
    are excluded with ``where``, so a NaN/inf there cannot leak into the value or the gradient.
    """
    if kd_mask.shape != kd_per_position.shape:
        raise ValueError(
            f"kd_mask shape {tuple(kd_mask.shape)} != kd_per_position shape {tuple(kd_per_position.shape)}"
        )
    if kd_eligible is not None and kd_eligible.shape != kd_mask.shape:
        raise ValueError(f"kd_eligible shape {tuple(kd_eligible.shape)} != kd_mask shape {tuple(kd_mask.shape)}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight (lambda) must be in [0, 1], got {ce_weight}")
    mask = kd_mask.bool()
    if kd_eligible is not None:
        if bool((mask & ~kd_eligible.bool()).any()):
            raise ValueError(
                "kd_mask marks positions that kd_eligible does not; every distilled position must be eligible"
            )
        count = kd_eligible.bool().sum()
    else:
        count = mask.sum()
    kd_sum = torch.where(mask, kd_per_position, torch.zeros_like(kd_per_position)).sum()
    kd = kd_sum / count.clamp(min=1).to(kd_sum.dtype)
    ce = ce_per_sample.mean() if ce_per_sample.numel() else ce_per_sample.sum()
    return ce_weight * ce + (1.0 - ce_weight) * kd
