"""The output head, run a chunk of rows at a time and only on the rows some loss or payload reads.

A causal LM's head turns each position's hidden state into a vocabulary-wide row of logits: at
Gemma-3's 262,144 tokens a 4 x 512 batch is 2 GiB of fp32 logits (more than the model), and
autograd keeps a gradient of the same size per loss. Fine-tuning reads only the rows with a label,
distillation the rows with a teacher target, sharing one top-k per real position. So:

* `final_hidden_states` runs the model with its head skipped (the head is handed zero rows), which
  keeps every wrapper's hooks (PEFT, FSDP2) in place and works for any causal LM;
* `OutputHead` projects the chosen rows `chunk_rows` at a time and reduces each chunk at once to
  what is read: CE and sparse KD (`head_training_loss`), or the label log-likelihood, top-k and
  log-sum-exp (`head_knowledge`). In training the gradient of the hidden rows is computed in the
  same pass (the approach of fused linear cross-entropy kernels), so neither a chunk's logits nor
  their gradient outlive the chunk, and the head's matmul is not run again in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmkt.errors import FedMKTError
from fedmkt.losses import EMPTY_SLOT, IGNORE_INDEX, sparse_kd_loss

__all__ = [
    "OutputHead",
    "forward_without_head",
    "final_hidden_states",
    "head_training_loss",
    "head_knowledge",
    "head_label_logprobs",
    "ChunkKnowledge",
]

# Elements of one chunk of logits: 2^24 fp32 values are 64 MiB, 64 rows at a 262k vocabulary.
# Large enough that the matmul runs at full speed ([64, H] x [H, V] is ~20 GFLOP for Gemma-3),
# small next to any model worth federating (a chunk's temporaries stay under ~300 MiB).
CHUNK_ELEMENTS = 2**24


def forward_without_head(model: Any, call: Callable[..., Any] | None = None, **inputs: Any) -> tuple[Tensor, Any]:
    """``(hidden [B, L, H], output)``: the model's forward with its output head skipped.

    A pre-hook records the head's input (the final hidden states, after the final norm) and hands
    the head zero positions instead, so no logits are computed while wrappers (PEFT, FSDP2's root
    unit, DDP) and the key/value cache behave as in any forward. `call` runs the forward (default
    ``model(**inputs)``); the output keeps everything but the logits.
    """
    head = model.get_output_embeddings()
    captured: list[Tensor] = []

    def record_and_skip(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(record_and_skip)
    try:
        output = (call or model)(**inputs)
    finally:
        handle.remove()
    input_ids = inputs["input_ids"]
    if len(captured) != 1 or captured[0].shape[:2] != input_ids.shape:
        raise FedMKTError(
            f"{type(model).__name__} did not pass [batch, length, hidden] states through its output head once. "
            "Fix: use a causal LM whose forward ends in its output embeddings (get_output_embeddings)."
        )
    return captured[0], output


def final_hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, L, H]``: the hidden states the model's output head would read (see `forward_without_head`)."""
    hidden, _ = forward_without_head(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return hidden


@dataclass(frozen=True)
class OutputHead:
    """The projection from hidden states to logits, as plain tensors (weight, bias, soft-capping)."""

    weight: Tensor
    """[V, H] output embedding (tied to the input embedding in most small models)."""

    bias: Optional[Tensor] = None
    """[V] or None."""

    softcap: Optional[float] = None
    """``cap * tanh(logits / cap)`` after the matmul (Gemma-2's `final_logit_softcapping`); None: off."""

    chunk_rows: int = 0
    """Rows per chunk; 0 picks ``CHUNK_ELEMENTS // V``."""

    @classmethod
    def of(cls, model: Any, chunk_rows: int = 0, trainable_ok: bool = False) -> OutputHead:
        """The head of a (PEFT-wrapped) causal LM.

        Refuses a trainable head (its gradient is never computed here) unless `trainable_ok`, for
        scoring without gradients.
        """
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise FedMKTError(
                f"{type(model).__name__}'s output head {type(head).__name__} is not a linear layer. "
                "Fix: use a causal LM with a linear output head (lm_head)."
            )
        if not trainable_ok and any(p.requires_grad for p in head.parameters()):
            raise FedMKTError(
                "the output head is trainable, but fedmkt trains it frozen (its gradient is never computed). "
                "Fix: remove lm_head from lora.target_modules."
            )
        bias = getattr(head, "bias", None)
        if hasattr(weight, "full_tensor"):  # an FSDP2 shard (DTensor): the whole head, gathered from every rank
            weight = weight.full_tensor()
            bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
        config = getattr(model, "config", None)
        softcap = getattr(config, "final_logit_softcapping", None)
        for name in ("logit_scale", "logits_scaling"):  # post-head scalings this path does not apply
            if getattr(config, name, None) not in (None, 1, 1.0):
                raise FedMKTError(
                    f"{type(model).__name__} scales its logits ({name}), which fedmkt's output head does not do. "
                    "Fix: use another architecture for this party."
                )
        return cls(weight, bias, float(softcap) if softcap else None, chunk_rows)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def rows_per_chunk(self) -> int:
        """`chunk_rows`, or as many rows as fit `CHUNK_ELEMENTS` logits."""
        return self.chunk_rows or max(1, CHUNK_ELEMENTS // self.vocab_size)

    def chunks(self, rows: int) -> Iterator[slice]:
        """Consecutive row slices of at most `rows_per_chunk` rows."""
        size = self.rows_per_chunk
        for start in range(0, rows, size):
            yield slice(start, min(start + size, rows))

    def project(self, hidden: Tensor) -> Tensor:
        """The head's matmul (``[n, H] -> [n, V]``), in the ambient autocast like the model's own head."""
        return F.linear(hidden, self.weight, self.bias)

    def finish(self, projected: Tensor) -> Tensor:
        """Logits from the matmul's output (soft-capping, where the model has it)."""
        if self.softcap is None:
            return projected
        return torch.tanh(projected / self.softcap) * self.softcap

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, V]`` logits of a few rows (the model's own head output at those rows)."""
        return self.finish(self.project(hidden))


def _label_slots(labels: Tensor) -> tuple[Tensor, Tensor]:
    """One KD slot of probability 1 at each row's label (empty where there is none)."""
    keep = labels != IGNORE_INDEX
    ids = torch.where(keep, labels, torch.full_like(labels, EMPTY_SLOT)).long().unsqueeze(-1)
    return ids, keep.to(torch.float32).unsqueeze(-1)


class _FusedHeadLoss(torch.autograd.Function):
    """``sum(ce_w * CE) + sum(kd_w * KD)`` over rows of hidden states, the gradient computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        head: OutputHead,
        labels: Tensor,
        ce_weights: Tensor,
        kd_ids: Optional[Tensor],
        kd_probs: Optional[Tensor],
        kd_weights: Optional[Tensor],
        temperature: float,
        kind: str,
        tail: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        needs_grad = ctx.needs_input_grad[0]
        rows = hidden.shape[0]
        ce_rows = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        kd_rows = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        label_ids, label_probs = _label_slots(labels)
        for part in head.chunks(rows):
            with torch.enable_grad():
                projected = head.project(hidden[part].detach()).detach().requires_grad_(needs_grad)
                logits = head.finish(projected).unsqueeze(0)
                ce = sparse_kd_loss(logits, label_ids[part].unsqueeze(0), label_probs[part].unsqueeze(0))[0]
                objective = (ce * ce_weights[part]).sum()
                if kd_ids is not None:
                    kd = sparse_kd_loss(
                        logits,
                        kd_ids[part].unsqueeze(0),
                        kd_probs[part].unsqueeze(0),
                        temperature,
                        kind,
                        tail=tail,
                    )[0]
                    objective = objective + (kd * kd_weights[part]).sum()
                    kd_rows[part] = kd.detach().float()
                if needs_grad:
                    (grad_projected,) = torch.autograd.grad(objective, projected)
            ce_rows[part] = ce.detach().float()
            total = total + objective.detach().float()
            if needs_grad:
                # The head's backward matmul, under the same autocast as its forward.
                weight = head.weight.to(grad_projected.dtype)
                grad_hidden[part] = (grad_projected @ weight).to(hidden.dtype)
            del projected, logits
        ctx.save_for_backward(grad_hidden if needs_grad else hidden.new_zeros(0))
        ctx.mark_non_differentiable(ce_rows, kd_rows)
        return total, ce_rows, kd_rows

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_ce: Tensor, _grad_kd: Tensor):
        (grad_hidden,) = ctx.saved_tensors
        grad = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad, None, None, None, None, None, None, None, None, None


def head_training_loss(
    head: OutputHead,
    hidden: Tensor,
    labels: Tensor,
    ce_weights: Tensor,
    kd_ids: Optional[Tensor] = None,
    kd_probs: Optional[Tensor] = None,
    kd_weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    kind: Literal["ce", "kl"] = "ce",
    tail: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(objective, ce_rows, kd_rows)`` over ``N`` rows of hidden states ``[N, H]``.

    ``objective = sum(ce_weights * CE) + sum(kd_weights * KD)`` (a scalar that backpropagates into
    `hidden`), with CE each row's ``-log p(label)`` (0 where the label is -100) and KD each row's
    sparse KD loss against ``kd_ids``/``kd_probs`` ``[N, k]`` (see `fedmkt.losses.sparse_kd_loss`);
    ``ce_rows``/``kd_rows`` are those per-row values, for logging. The weights carry the
    objective's normalisation (`fedmkt.losses.loss_weights`). The logits exist one chunk at a time.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:1] or ce_weights.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and ce_weights must be [N] with N = {hidden.shape[0]}")
    if (kd_ids is None) != (kd_probs is None) or (kd_ids is None) != (kd_weights is None):
        raise ValueError("kd_ids, kd_probs and kd_weights go together")
    return _FusedHeadLoss.apply(
        hidden, head, labels, ce_weights, kd_ids, kd_probs, kd_weights, float(temperature), kind, bool(tail)
    )


@dataclass
class ChunkKnowledge:
    """What a party shares about rows of its hidden states (see `head_knowledge`)."""

    label_logprob: Tensor
    """[N] float32: log p(label) at each row (0 where the label is -100)."""

    topk_values: Tensor
    """[N, k]: the k largest logits, in the logits' dtype."""

    topk_ids: Tensor
    """[N, k] long: their token ids."""

    logsumexp: Tensor
    """[N] float32: ``log sum_v exp(logit_v / T)`` over the whole vocabulary."""


@torch.no_grad()
def head_knowledge(
    head: OutputHead, hidden: Tensor, labels: Tensor, top_k: int, temperature: float = 1.0
) -> ChunkKnowledge:
    """Per row of ``hidden`` ``[N, H]``: the label's log-probability, the top-k logits and the log-sum-exp at `temperature`."""
    rows = hidden.shape[0]
    label_logprob = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    logsumexp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    values, ids = [], []
    has_label = labels != IGNORE_INDEX
    for part in head.chunks(rows):
        logits = head.logits(hidden[part])
        wide = logits.float()
        lse = torch.logsumexp(wide, dim=-1)
        picked = wide.gather(1, labels[part].clamp(min=0).unsqueeze(1)).squeeze(1)
        label_logprob[part] = torch.where(has_label[part], picked - lse, torch.zeros_like(lse))
        logsumexp[part] = lse if temperature == 1.0 else torch.logsumexp(wide / temperature, dim=-1)
        top_values, top_ids = logits.topk(top_k, dim=-1)
        values.append(top_values)
        ids.append(top_ids)
        del logits, wide
    empty = hidden.new_zeros((0, top_k)), torch.zeros((0, top_k), dtype=torch.long, device=hidden.device)
    return ChunkKnowledge(
        label_logprob=label_logprob,
        topk_values=torch.cat(values) if values else empty[0],
        topk_ids=torch.cat(ids) if ids else empty[1],
        logsumexp=logsumexp,
    )


@torch.no_grad()
def head_label_logprobs(head: OutputHead, hidden: Tensor, labels: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """``[N]`` float32: ``log p(labels[n])`` at row ``rows[n]`` of ``hidden`` ``[M, H]`` (every label a real token id).

    Without `rows`, label n reads row n (``M = N``). With them, several labels can share a row (the
    options of one question after its prompt), which then runs through the head once.
    """
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
    for part in head.chunks(hidden.shape[0]):
        wide = head.logits(hidden[part]).float()
        lse = torch.logsumexp(wide, dim=-1)
        if rows is None:
            out[part] = wide.gather(1, labels[part].unsqueeze(1)).squeeze(1) - lse
            continue
        reading = ((rows >= part.start) & (rows < part.stop)).nonzero().squeeze(1)
        local = rows[reading] - part.start
        out[reading] = wide[local, labels[reading]] - lse[local]
    return out
