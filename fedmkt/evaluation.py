"""Zero-shot scoring as lm-evaluation-harness does it: multiple-choice QA by log-likelihood, Rouge-L.

A multiple-choice question is answered by the option whose continuation the model finds most likely
after the prompt; no generation, no answer parsing. `acc` takes the raw summed log-likelihood,
`acc_norm` divides it by the continuation's length in characters so long options are not penalised
for having more tokens. (lm-evaluation-harness describes acc_norm as byte-length normalisation; its
code divides by `len()` of the option string, i.e. characters, which is the same for ASCII text.
We count the continuation as trained on, i.e. with its leading space, so every option gets +1.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from fedmkt.data.tasks import QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.errors import FedMKTError

__all__ = ["choice_loglikelihoods", "evaluate_multiple_choice", "assert_disjoint", "rouge_l"]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and out of the score


def _forward_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> Tensor:
    """Logits at sequence positions `keep` only ([B, len(keep), V]).

    Asking the model for just those positions (`logits_to_keep`) avoids a [B, L, V] tensor, which at
    Gemma-3's 262k vocabulary is gigabytes for a batch of long BoolQ passages. Models that do not
    know the argument get the full forward and are indexed afterwards.
    """
    length = input_ids.shape[1]
    if len(keep) < length:
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        except TypeError:
            logits = None
        if logits is not None and logits.shape[1] == len(keep):
            return logits
        if logits is not None and logits.shape[1] == length:
            return logits[:, keep]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, keep]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def _score_pairs(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, max_length: int, device: torch.device
) -> Tensor:
    """Summed log-probability of each answer given its prompt, one float per (prompt, answer) pair."""
    encoded = [encode_prompt_answer(tokenizer, prompt, answer, max_length) for prompt, answer in pairs]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = torch.empty(len(encoded), dtype=torch.float64)
    pad_id = _pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i][0], "targets": encoded[i][1]} for i in rows], pad_id)
        targets = batch["targets"].to(device)
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        logits = _forward_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep)
        targets = targets[:, keep]
        mask = targets != IGNORE_INDEX
        logprobs = F.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores[rows] = (picked * mask).sum(dim=1).double().cpu()
    return scores


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    batch_size: int = 8,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """For each example, the summed log-likelihood of every choice continuation ([num_choices] each).

    Batched over all (example, choice) pairs; the model is put in eval mode and given back in the
    mode it came in, so this can run mid-training.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    pairs = [(example.prompt, choice) for example in examples for choice in example.choices]
    was_training = model.training
    model.eval()
    try:
        flat = _score_pairs(model, tokenizer, pairs, batch_size, max_length, device)
    finally:
        model.train(was_training)
    return list(flat.split([len(example.choices) for example in examples]))


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    batch_size: int = 8,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """`{"acc", "acc_norm"}` of `model` on `examples` (see the module docstring for the two)."""
    if not examples:
        raise FedMKTError("No examples to evaluate. Fix: give the task a non-empty evaluation split (eval_size > 0).")
    loglikelihoods = choice_loglikelihoods(model, tokenizer, examples, batch_size, max_length, device)
    acc, acc_norm = MeanMetric(), MeanMetric()
    for example, scores in zip(examples, loglikelihoods):
        lengths = torch.tensor([len(choice) for choice in example.choices], dtype=torch.float64)
        acc.update(float(int(scores.argmax()) == example.answer_index))
        acc_norm.update(float(int((scores / lengths).argmax()) == example.answer_index))
    return {"acc": float(acc.compute()), "acc_norm": float(acc_norm.compute())}


def assert_disjoint(evaluation: list[QAExample], training: list[QAExample]) -> None:
    """Raise if an evaluation example is also a training example: a score on seen data means nothing."""
    overlap = {e.uid for e in evaluation} & {e.uid for e in training}
    if overlap:
        raise FedMKTError(
            f"{len(overlap)} evaluation example(s) are also in the training data (e.g. uid {sorted(overlap)[0]!r}). "
            "Fix: build both from one split_task call so the held-out part is excluded from training."
        )


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure of `predictions` against `references` (the paper's metric for generation)."""
    from torchmetrics.text.rouge import ROUGEScore  # rougeL needs no nltk; only rougeLsum does

    if len(predictions) != len(references):
        raise FedMKTError(
            f"rouge_l got {len(predictions)} predictions for {len(references)} references. Fix: pass one per reference."
        )
    if not predictions:
        raise FedMKTError("rouge_l got no predictions. Fix: evaluate on a non-empty split.")
    metric = ROUGEScore(rouge_keys="rougeL")
    return float(metric(predictions, references)["rougeL_fmeasure"])
