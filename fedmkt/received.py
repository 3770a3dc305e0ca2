"""What a receiver checks in a teacher's payload before it trusts any number in it.

`KnowledgePayload.validate` checks what any payload must satisfy (shapes, finite values, ids in
the sender's vocabulary). A receiver knows more: the round, the agreed `top_k`, `max_length` and
temperature, the sender's tokenizer, and the public questions themselves. `verify_payload` checks
the payload against all of it, and recomputes the sender's per-sample loss from the label
log-probabilities it sent, so DualMinCE never ranks teachers by a number the sender merely
reported:

* every sample's answer text must be an answer the public question allows: its gold answer on a
  labelled public set; on an unlabelled one, one of its options (multiple choice) or a text of at
  most `data.max_new_tokens` tokens (generation);
* every sample's tokens must be the sender's tokenization of that public question followed by
  that answer (so a sender cannot pass off other text, a node's private rows included, as public
  knowledge);
* the loss is ``-sum(label_logprob)`` over the positions the receiver distills (the answer's, or
  every position's next token under `kd_positions: all`: `fedmkt.selection.scored_targets`)
  divided by that text's UTF-8 bytes (nats per byte, comparable across tokenizers), which the
  receiver finds itself; a reported loss that disagrees is refused. A teacher that sends any
  distribution it likes at a prompt position pays for it in the loss that ranks it;
* at every position the log-sum-exp must be at least that of the sender's own top-k logits (else
  the listed probabilities would sum past 1);
* at temperature 1 each scored label log-probability must agree with the sender's own top-k logits and
  log-sum-exp: a label among the top-k has exactly that logit's probability, any other label at
  most the k-th one's, within the float16 rounding of that logit itself (a tolerance the sender
  cannot widen with a far-off filler logit). A low loss therefore needs a distribution that really
  puts mass on the answer, which is what the receiver then distills;
* where the label log-probabilities cannot be checked against the top-k (noised logits, or a
  temperature other than 1), they are not used: the loss that ranks the sender is the one the
  receiver derives from the distribution it would distill (the listed probability of each scored
  token, or the most an unlisted one can have).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedmkt.data.examples import Example, QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, encode_prompt_answer
from fedmkt.errors import FedMKTError
from fedmkt.payload import KnowledgePayload
from fedmkt.selection import scored_bytes, scored_targets

__all__ = ["Agreement", "PublicTokens", "allowed_answer", "verify_payload", "payload_byte_limit"]

LOSS_TOLERANCE = 1e-3
"""Largest difference (absolute, plus the same relative) between a reported and a recomputed loss."""

EMBEDDING_PADDING = 1024
"""How many more output rows than tokenizer entries a model may have (OPT, Bloom and Qwen pad their
embeddings to a round number)."""

LOGPROB_TOLERANCE = 1e-3
"""Constant slack (nats) for comparing label log-probabilities with the top-k logits, on top of the
float16 rounding of the logit compared (`FLOAT16_ROUNDING` of its magnitude)."""

FLOAT16_ROUNDING = 2.0**-11
"""Float16's largest relative rounding error (half a unit in the last of its 11 significant bits)."""

UNLISTED_LOGPROB_FLOOR = -30.0
"""A derived log-probability for a token the shared distribution gives no mass (noised logits share
none outside the k ids): finite, and lower than any real teacher's."""


@dataclass(frozen=True)
class Agreement:
    """What every party of a run agreed on, as far as one sender's payload is concerned."""

    round: int
    top_k: int
    max_length: int
    temperature: float
    tokenizer_size: int
    """The sender's tokenizer's size, as the receiver knows it."""

    noised: bool = False
    """Whether the run noises shared logits (`privacy.logit_noise`): the top-k then no longer match
    the label log-probabilities, and that check is skipped."""

    public_labelled: bool = True
    """Whether the public set has answers: then every sample must be shared along its gold answer."""

    max_new_tokens: int = 32
    """Unlabelled generation: the most answer tokens a sender's own answer may have."""

    kd_positions: str = "all"
    """`transfer.kd_positions`: the positions the receiver distills, so the ones checked and scored."""


class PublicTokens:
    """The public questions in one sender's tokens, followed by an answer, built on first use and kept."""

    def __init__(self, tokenizer: Any, examples: list[Example], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.examples = examples
        self.max_length = max_length
        self._encoded: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, index: int, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)`` of public sample `index` answered with `answer`, as the sender must
        have tokenized it."""
        key = (index, answer)
        if key not in self._encoded:
            prompt = self.examples[index].prompt
            self._encoded[key] = encode_prompt_answer(self.tokenizer, prompt, answer, self.max_length)
        return self._encoded[key]


def allowed_answer(example: Example, answer: str, labelled: bool) -> bool:
    """Whether `answer` is one the public question allows (its gold answer, or one of its options)."""
    if labelled:
        return answer == example.answer
    if isinstance(example, QAExample):
        return answer in example.choices
    return bool(answer.strip()) and "\n" not in answer.strip()


def payload_byte_limit(num_public: int, max_length: int, top_k: int) -> int:
    """The most bytes an honest payload about `num_public` samples can take, with room to spare.

    Per position: a token id and k ids (4 bytes each at most), k float16 values, two float32
    numbers (log-sum-exp, label log-probability) and room for 32 bytes of answer text; per sample an
    index, a loss and two offsets; plus the safetensors header. Twice that, so no honest payload
    comes near it.
    """
    per_position = 4 + top_k * (4 + 2) + 4 + 4 + 32
    per_sample = 8 + 4 + 8 + 8
    return 2 * (num_public * (max_length * per_position + per_sample) + 64 * 1024)


def verify_payload(payload: KnowledgePayload, agreed: Agreement, public: PublicTokens) -> KnowledgePayload:
    """The payload with its losses recomputed from its label log-probabilities, or a one-line `FedMKTError`.

    Nothing in the error quotes the payload's text or the public questions: only counts, keys and
    sample indices.
    """
    problems = []
    if payload.round != agreed.round:
        problems.append(f"it is for round {payload.round}, not round {agreed.round}")
    if payload.top_k != agreed.top_k:
        problems.append(f"it carries top-{payload.top_k} logits where transfer.top_k is {agreed.top_k}")
    if not agreed.tokenizer_size <= payload.vocab_size <= agreed.tokenizer_size + EMBEDDING_PADDING:
        problems.append(
            f"its vocabulary has {payload.vocab_size} ids for a tokenizer of {agreed.tokenizer_size} tokens"
        )
    if not math.isclose(payload.temperature, agreed.temperature):
        problems.append(f"its log-sum-exp is at temperature {payload.temperature}, not {agreed.temperature}")
    rows = payload.offsets.diff()
    if len(rows) and int(rows.max()) > agreed.max_length:
        problems.append(f"a sample has {int(rows.max())} positions, over data.max_length = {agreed.max_length}")
    if bool((payload.losses < 0).any()):
        problems.append("a loss is negative")
    if bool((payload.label_logprob > LOGPROB_TOLERANCE).any()):
        problems.append("a label log-probability is positive")
    if len(payload.logsumexp) and bool((_topk_logsumexp_excess(payload) > 0).any()):
        problems.append("a log-sum-exp is below that of its own top-k logits")
    if problems:
        raise _refused(payload, problems)

    derived = agreed.noised or payload.temperature != 1.0  # label log-probabilities cannot be checked
    losses = torch.empty(len(payload), dtype=torch.float32)
    wrong_answer, wrong_tokens, wrong_loss, inconsistent = [], [], [], []
    for row, index in enumerate(payload.sample_index.tolist()):
        start, stop = int(payload.offsets[row]), int(payload.offsets[row + 1])
        answer = payload.answer_text(row)
        if not answer or not allowed_answer(public.examples[index], answer, agreed.public_labelled):
            wrong_answer.append(index)
            continue
        try:
            input_ids, targets = public(index, answer)
        except FedMKTError:  # an answer that cannot be a sample (no tokens, no room for the prompt)
            wrong_answer.append(index)
            continue
        if stop - start != len(input_ids) or not torch.equal(payload.token_ids[start:stop].long(), input_ids):
            wrong_tokens.append(index)
            continue
        labelled = targets != IGNORE_INDEX
        generated = not agreed.public_labelled and not isinstance(public.examples[index], QAExample)
        if generated and int(labelled.sum()) > agreed.max_new_tokens:
            wrong_answer.append(index)
            continue
        text_bytes = scored_bytes(public.examples[index].prompt, answer, agreed.kd_positions)
        targets = scored_targets(input_ids, targets, agreed.kd_positions)
        if derived:  # ranked by the distribution it would teach, not by numbers it reports
            losses[row] = -_distilled_logprobs(payload, start, stop, targets).sum() / text_bytes
            continue
        logprobs = payload.label_logprob[start:stop].float()
        losses[row] = -logprobs[targets != IGNORE_INDEX].sum() / text_bytes
        reported = float(payload.losses[row])
        if abs(reported - float(losses[row])) > LOSS_TOLERANCE * (1 + abs(float(losses[row]))):
            wrong_loss.append(index)
        if not _consistent(payload, start, stop, targets, logprobs):
            inconsistent.append(index)
    for indices, what in (
        (
            wrong_answer,
            "answers the public question does not allow (not its gold answer, options or length) for public sample(s)",
        ),
        (wrong_tokens, "tokens that are not the sender's tokenization of public sample(s)"),
        (wrong_loss, "losses that disagree with its label log-probabilities for public sample(s)"),
        (inconsistent, "label log-probabilities that disagree with its own top-k logits for public sample(s)"),
    ):
        if indices:
            problems.append(f"{what} {_first(indices)}")
    if problems:
        raise _refused(payload, problems)
    return replace(payload, losses=losses)


def _consistent(
    payload: KnowledgePayload, start: int, stop: int, targets: torch.Tensor, logprobs: torch.Tensor
) -> bool:
    """At temperature 1, whether each labelled position's log-probability fits the sender's top-k and log-sum-exp."""
    labelled = (targets != IGNORE_INDEX).nonzero().flatten()
    if not len(labelled):
        return True
    ids = payload.topk_ids[start:stop][labelled].long()
    values = payload.topk_logits[start:stop][labelled].float() - payload.logsumexp[start:stop][labelled, None]
    label = targets[labelled]
    claimed = logprobs[labelled]
    listed = ids == label[:, None]
    in_topk = listed.any(dim=1)
    raw = payload.topk_logits[start:stop][labelled].float()
    exact = torch.where(listed, values, torch.zeros_like(values)).sum(dim=1)
    own_logit = torch.where(listed, raw, torch.zeros_like(raw)).sum(dim=1).abs()
    ok_listed = (claimed - exact).abs() <= LOGPROB_TOLERANCE + FLOAT16_ROUNDING * own_logit
    smallest = values.amin(dim=1)
    smallest_logit = raw.amin(dim=1).abs()
    ok_other = claimed <= smallest + LOGPROB_TOLERANCE + FLOAT16_ROUNDING * smallest_logit
    return bool(torch.where(in_topk, ok_listed, ok_other).all())


def _topk_logsumexp_excess(payload: KnowledgePayload) -> torch.Tensor:
    """Per position, how far the log-sum-exp of the top-k logits (at the payload's temperature)
    exceeds the shared log-sum-exp, beyond float16 rounding: positive means the shared one is too low."""
    raw = payload.topk_logits.float() / payload.temperature
    rounding = FLOAT16_ROUNDING * raw.abs().amax(dim=1)
    return torch.logsumexp(raw, dim=1) - payload.logsumexp.float() - LOGPROB_TOLERANCE - rounding


def _distilled_logprobs(payload: KnowledgePayload, start: int, stop: int, targets: torch.Tensor) -> torch.Tensor:
    """Each answer token's log-probability under the distribution the receiver would distill (the
    top-k at the payload's temperature): its listed probability, or for an unlisted token the most
    it can have (the smallest listed one, and no more than the mass left outside the k ids)."""
    labelled = (targets != IGNORE_INDEX).nonzero().flatten()
    if not len(labelled):
        return torch.zeros(0)
    ids = payload.topk_ids[start:stop][labelled].long()
    logprobs = payload.topk_logits[start:stop][labelled].float() / payload.temperature
    logprobs = logprobs - payload.logsumexp[start:stop][labelled, None].float()
    listed = ids == targets[labelled][:, None]
    exact = torch.where(listed, logprobs, torch.zeros_like(logprobs)).sum(dim=1)
    outside = (1.0 - logprobs.exp().sum(dim=1) - LOGPROB_TOLERANCE).clamp_min(0.0)  # float32 sums leave ~1e-7
    bound = torch.minimum(logprobs.amin(dim=1).exp(), outside)
    unlisted = bound.clamp_min(math.exp(UNLISTED_LOGPROB_FLOOR)).log()
    return torch.where(listed.any(dim=1), exact, unlisted)


def _first(indices: list[int], shown: int = 5) -> str:
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return ", ".join(str(i) for i in indices[:shown]) + more


def _refused(payload: KnowledgePayload, problems: list[str]) -> FedMKTError:
    return FedMKTError(
        f"refused payload from {payload.sender}: {'; '.join(problems)}. Fix: nothing is distilled from it; "
        "check that party's fedmkt version, model and config."
    )
