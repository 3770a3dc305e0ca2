"""Task cross-entropy and sparse top-k knowledge distillation.

FedMKT distills from teachers that only ever send their top-k (token id, probability) pairs per
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

from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "EMPTY_SLOT",
    "DEFAULT_CHUNK_SIZE",
    "token_cross_entropy",
    "sparse_kd_loss",
    "kd_objective",
    "loss_weights",
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


def _tail_log_mass(rows: Tensor, temperature: float, kept_ids: Tensor) -> Tensor:
    """``log sum_{v not in kept} exp(rows_v / T)`` of a ``[n, V]`` chunk, exactly (no ``1 - sum`` cancellation).

    ``kept_ids`` ``[n, k]`` lists each row's kept ids (every slot a kept id). The exponentials are
    taken once, the kept ones set to 0, and the rest summed; a row whose whole mass is kept gets
    the log of a tiny floor rather than -inf, so a teacher that puts mass there gives a large
    finite loss.
    """
    acc = torch.promote_types(rows.dtype, torch.float32)
    row_max = rows.amax(dim=-1, keepdim=True).to(acc)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = torch.add(row_max / -temperature, rows, alpha=1.0 / temperature).exp_()
    shifted.scatter_(1, kept_ids, 0.0)
    tail = shifted.sum(dim=-1).clamp_min_(_TAIL_FLOOR).log_()
    return tail + row_max.squeeze(-1) / temperature


# Smallest tail mass (relative to the row's largest term) the student is credited with.
_TAIL_FLOOR = 1e-30


def _scatter_index(ids: Tensor, valid: Tensor) -> Tensor:
    """``ids`` with each empty slot pointing at its row's first valid id, so a scatter over all slots
    writes only kept ids (rows without a valid slot keep their dummy ids; nothing is kept there)."""
    first_valid = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    return torch.where(valid, ids, ids.gather(1, first_valid))


class _SparseSoftTargetCE(torch.autograd.Function):
    """Per-row ``-sum_j p_j * log_softmax(x / T)[id_j]`` (+ ``sum_j p_j log p_j`` for KL).

    With ``tail``, the teacher's remaining mass ``p_t = 1 - sum_j p_j`` is matched against the
    student's mass outside the row's ids: ``- p_t * log q_t`` (+ ``p_t log p_t`` for KL).
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
        tail: bool,
    ) -> Tensor:
        batch, length, _ = logits.shape
        flat = _can_flatten(logits)
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(batch * length, dtype=acc, device=logits.device)
        tail_lse = torch.empty(batch * length if tail else 0, dtype=acc, device=logits.device)
        kept_index = _scatter_index(ids, valid) if tail else ids
        for start, stop in _row_ranges(batch, length, chunk_size, flat):
            rows = _rows(logits, start, stop)
            lse[start:stop] = _chunk_scaled_logsumexp(rows, temperature)
            if tail:
                tail_lse[start:stop] = _tail_log_mass(rows, temperature, kept_index[start:stop])
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
        tail_probs = _tail_probs(probs, valid) if tail else probs.new_zeros(0)
        if tail:
            loss = loss - tail_probs * (tail_lse - lse)
            if kl:
                loss = loss + torch.xlogy(tail_probs, tail_probs)
        ctx.save_for_backward(logits, ids, probs, valid, lse, target_logp, tail_lse, tail_probs, kept_index)
        ctx.temperature = temperature
        ctx.kl = kl
        ctx.tail = tail
        ctx.chunk_size = chunk_size
        ctx.inplace_grad = inplace_grad
        ctx.flat = flat
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, ids, probs, valid, lse, target_logp, tail_lse, tail_probs, kept_index = ctx.saved_tensors
        temperature, chunk_size, tail = ctx.temperature, ctx.chunk_size, ctx.tail
        grad_logits = grad_probs = None

        if ctx.needs_input_grad[0]:
            grad_loss = grad_loss.to(lse.dtype)
            prob_mass = probs.sum(dim=1)  # sum_j p_j per row
            if tail:
                prob_mass = prob_mass + tail_probs
                tail_scale = -(tail_probs * grad_loss / temperature)  # [N]
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
                if tail:
                    # - p_t / T * q_v / q_t on every id outside the kept ones, from its own exponent
                    # (x / T - log q_t <= 0 there), so no large factor ever cancels at a kept id.
                    outside = torch.add(tail_lse[start:stop].neg().unsqueeze(1), rows, alpha=1.0 / temperature)
                    outside = outside.to(work.dtype).exp_().scatter_(1, kept_index[start:stop], 0.0)
                    work.add_(outside.mul_(tail_scale[start:stop].unsqueeze(1)))
                    del outside
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
            if tail:  # p_t = 1 - sum_j p_j: each p_j also moves the tail term
                g = g + (tail_lse - lse).unsqueeze(1)
                if ctx.kl:
                    g = g - torch.where(
                        tail_probs > 0, torch.log(tail_probs) + 1, torch.zeros_like(tail_probs)
                    ).unsqueeze(1)
            g = torch.where(valid, g, torch.zeros_like(g))
            grad_probs = g * grad_loss.to(g.dtype).unsqueeze(1)

        return grad_logits, None, grad_probs, None, None, None, None, None, None


def _tail_probs(probs: Tensor, valid: Tensor) -> Tensor:
    """The teacher's mass outside its listed ids, ``max(0, 1 - sum_j p_j)``; 0 on rows with no valid slot."""
    mass = torch.where(valid, probs, torch.zeros_like(probs)).sum(dim=1)
    return torch.where(valid.any(dim=1), (1.0 - mass).clamp_min(0.0), torch.zeros_like(mass))


def sparse_kd_loss(
    logits: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    kind: Literal["ce", "kl"] = "ce",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    inplace_grad: bool = False,
    tail: bool = False,
) -> Tensor:
    """Per-position KD loss against a top-k teacher distribution, without a dense target.

    ``kind="ce"``: ``-sum_slots p * log_softmax(logits / T)[id]`` (soft-target cross-entropy);
    ``kind="kl"``: the same minus the target entropy, i.e. ``KL(p || softmax(logits / T))``.
    Slots with id ``-1`` are empty; a position with no non-empty slot gets loss 0 and gradient 0.
    Duplicate ids within a position are summed (the dense reference would keep only one of them).

    ``tail=True`` (``transfer.topk_target: tail``): the probabilities are the teacher's true ones
    on its top-k ids (summing to at most 1), and the mass they leave, ``1 - sum p``, becomes one
    more class, matched against the student's mass outside the position's ids: the KD of the
    teacher's full distribution coarsened to k + 1 classes. Ids must then be distinct per position.
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
    if tail and _has_repeated_ids(flat_ids, valid):
        raise ValueError("with tail=True every position's target ids must be distinct")
    flat_ids = torch.where(valid, flat_ids, torch.zeros_like(flat_ids))
    flat_probs = target_probs.reshape(batch * length, k)
    flat_probs = torch.where(valid, flat_probs, torch.zeros_like(flat_probs))
    loss = _SparseSoftTargetCE.apply(
        logits,
        flat_ids,
        flat_probs,
        valid,
        float(temperature),
        kind == "kl",
        int(chunk_size),
        bool(inplace_grad),
        bool(tail),
    )
    return loss.view(batch, length)


def _has_repeated_ids(ids: Tensor, valid: Tensor) -> bool:
    """Whether some row lists one valid id in two slots."""
    if ids.shape[1] <= 1:
        return False
    # Empty slots get distinct negative ids so they never count as repeats.
    marked = torch.where(valid, ids, -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
    ordered = marked.sort(dim=1).values
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


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


def loss_weights(
    has_label: Tensor,
    kd_mask: Optional[Tensor] = None,
    kd_eligible: Optional[Tensor] = None,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-position weights ``(ce_w, kd_w)`` ``[B, L]`` such that FedMKT's objective is
    ``sum(ce_w * ce_per_position) + sum(kd_w * kd_per_position)``.

    Each term is a per-sample mean over its own positions, then a mean over the batch:
    ``mean_b [lambda * CE_b + (1 - lambda) * T^2 * KD_b]`` with ``CE_b`` the mean over sample b's
    label positions and ``KD_b`` the sum over its distilled positions (``kd_mask``) divided by its
    KD-eligible ones (``kd_eligible``; every position that would be distilled had DualMinCE
    selected the sample; ``None``: the distilled ones). A sample that was not selected adds 0 KD
    but still counts in the batch, so a token's weight never depends on its batch-mates, and
    lambda is each sample's own share of the loss. ``T^2`` keeps the gradient's size independent
    of the temperature (Hinton et al.), so the temperature changes the target only.

    The reference implementation (FATE-LLM, from FuseLLM) takes the CE as a mean over the batch's
    label tokens and divides the KD sum by every non-pad token of the batch, without ``T^2``. With
    labels on a short answer after a long prompt, that leaves KD about 1/100 of CE's weight at the
    positions a task is scored on (ARC-Easy, lambda 0.9): the transfer is then effectively off.
    Without ``kd_mask`` (training on private data) the objective is the mean per-sample CE.
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight (lambda) must be in [0, 1], got {ce_weight}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = has_label.shape[0]
    label = has_label.bool()
    per_label = 1.0 / (batch * label.sum(dim=1, keepdim=True).clamp(min=1))
    if kd_mask is None:
        return label * per_label, torch.zeros(label.shape, dtype=per_label.dtype, device=label.device)
    if kd_mask.shape != label.shape:
        raise ValueError(f"kd_mask shape {tuple(kd_mask.shape)} != label shape {tuple(label.shape)}")
    mask = kd_mask.bool()
    if kd_eligible is not None:
        if kd_eligible.shape != mask.shape:
            raise ValueError(f"kd_eligible shape {tuple(kd_eligible.shape)} != kd_mask shape {tuple(mask.shape)}")
        if bool((mask & ~kd_eligible.bool()).any()):
            raise ValueError(
                "kd_mask marks positions that kd_eligible does not; every distilled position must be eligible"
            )
        denominators = kd_eligible.bool().sum(dim=1, keepdim=True)
    else:
        denominators = mask.sum(dim=1, keepdim=True)
    per_kd = (1.0 - ce_weight) * temperature**2 / (batch * denominators.clamp(min=1))
    return label * (ce_weight * per_label), mask * per_kd


def kd_objective(
    ce_per_sample: Tensor,
    kd_per_position: Tensor,
    kd_mask: Tensor,
    ce_weight: float,
    kd_eligible: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """FedMKT's ``mean_b [lambda * CE_b + (1 - lambda) * T^2 * KD_b]`` as one scalar (see :func:`loss_weights`).

    ``ce_per_sample`` holds each sample's token-mean CE; ``KD_b`` is the sum of
    ``kd_per_position`` over sample b's ``kd_mask`` divided by its ``kd_eligible`` count (its
    ``kd_mask`` count when ``None``); a sample with no distilled position has KD 0. Masked-out
    entries are excluded with ``where``, so a NaN/inf there cannot leak into the value or the gradient.
    """
    if kd_mask.shape != kd_per_position.shape:
        raise ValueError(
            f"kd_mask shape {tuple(kd_mask.shape)} != kd_per_position shape {tuple(kd_per_position.shape)}"
        )
    one_label = torch.zeros(kd_mask.shape, dtype=torch.bool, device=kd_mask.device)
    one_label[:, :1] = True  # each sample's CE is already its mean: one position of weight lambda / B
    ce_w, kd_w = loss_weights(one_label, kd_mask, kd_eligible, ce_weight, temperature)
    kd_terms = torch.where(kd_mask.bool(), kd_per_position * kd_w.to(kd_per_position.dtype), 0.0)
    ce = (ce_per_sample * ce_w[:, 0].to(ce_per_sample.dtype)).sum()
    return ce + kd_terms.sum()
