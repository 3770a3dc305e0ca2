"""Scoring as lm-evaluation-harness does it: multiple-choice QA by log-likelihood, generation by Rouge-L.

A multiple-choice question is answered by the option whose continuation the model finds most likely
after the prompt; no generation, no answer parsing. `acc` takes the raw summed log-likelihood,
`acc_norm` divides it by the continuation's length in characters so long options are not penalised
for having more tokens. (lm-evaluation-harness describes acc_norm as byte-length normalisation; its
code divides by `len()` of the option string, i.e. characters, which is the same for ASCII text.
Like lm-eval's `completion_len`, the length is the option's without the space that joins it to the
prompt: fedmkt stores options as continuations, " Paris", and counts 5 characters for it.)

A generation example is answered by greedy decoding up to the first newline and scored with Rouge-L
(the paper's metric) and exact match after SQuAD-style normalisation. Accuracies come with a 95 %
Wilson score interval, which stays inside [0, 1] and is sound at the small n of a quick run.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from fedmkt.data.examples import GenerationExample, QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer, prompt_ids
from fedmkt.errors import FedMKTError
from fedmkt.fastpaths import FAST
from fedmkt.head import OutputHead, forward_without_head, head_label_logprobs
from fedmkt.progress import LineProgress, on_terminal

__all__ = [
    "choice_loglikelihoods",
    "evaluate_multiple_choice",
    "evaluate_generation",
    "generate_greedy",
    "wilson_interval",
    "paired_bootstrap",
    "exact_match",
    "rouge_l",
]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion `successes / n`."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(a: str, b: str, resamples: int = 10_000, seed: int = 0) -> tuple[float, list[float]]:
    """Accuracy difference of two models on the same questions, with its 95 % percentile interval.

    `a` and `b` are per-question records ("1" right, "0" wrong) in the same order; each resample
    draws questions with replacement and scores both models on the same draw, so the interval
    reflects how much the two differ on shared questions rather than each model's own noise.
    """
    return pooled_paired_bootstrap([a], [b], resamples, seed)


def pooled_paired_bootstrap(
    a: list[str], b: list[str], resamples: int = 10_000, seed: int = 0
) -> tuple[float, list[float]]:
    """`paired_bootstrap` over several seeds: `a[s]` and `b[s]` are the records of seed `s` (the
    same questions in every seed). Each question's difference is averaged over the seeds first, and
    the resamples draw questions, so a question counts once however many seeds scored it."""
    if not a or len(a) != len(b):
        raise ValueError(f"pooled records need one record per seed on each side ({len(a)} vs {len(b)})")
    deltas = []
    for first, second in zip(a, b):
        if len(first) != len(second) or not first or len(first) != len(a[0]):
            raise ValueError(f"paired records must be non-empty and equally long ({len(first)} vs {len(second)})")
        x = np.frombuffer(first.encode(), dtype=np.uint8) - ord("0")
        y = np.frombuffer(second.encode(), dtype=np.uint8) - ord("0")
        deltas.append((x.astype(np.int64) - y).astype(np.float64))
    delta = np.mean(deltas, axis=0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x n
        stop = min(start + 1000, resamples)
        means[start:stop] = delta[rng.integers(0, len(delta), size=(stop - start, len(delta)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(delta.mean()), [float(low), float(high)]


def _progress(total: int, description: Optional[str]):
    """A tqdm bar over `total` items (plain lines when the output is not a terminal), or None when
    there is nothing to describe."""
    if description is None:
        return None
    if not on_terminal():
        return LineProgress(total, description)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="q", leave=False, dynamic_ncols=True)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out of attention and out of the score


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


_OPTIONAL_KWARGS = ("logits_to_keep", "use_cache")


def _call(model: Any, **kwargs: Any) -> Any:
    """`model(**kwargs)`, dropping the optional arguments (`_OPTIONAL_KWARGS`) a forward rejects."""
    while True:
        try:
            return model(**kwargs)
        except TypeError as error:
            rejected = [k for k in _OPTIONAL_KWARGS if k in kwargs and f"'{k}'" in str(error)]
            if not rejected:
                raise
            for key in rejected:
                kwargs.pop(key)


def _logits_at(model: Any, keep: Tensor, **kwargs: Any) -> tuple[Tensor, Any]:
    """Logits at sequence positions `keep` only ([B, len(keep), V]), and the model's output.

    Asking the model for just those positions (`logits_to_keep`) avoids a [B, L, V] tensor, which at
    Gemma-3's 262k vocabulary is gigabytes for a batch of long BoolQ passages. Models that do not
    know the argument compute all positions, which are indexed afterwards.
    """
    output = _call(model, logits_to_keep=keep, **kwargs)
    logits = output.logits
    if logits.shape[1] != len(keep):
        logits = logits[:, keep]
    return logits, output


def _output_head(model: Any) -> Optional[OutputHead]:
    """The model's linear output head, or None: such a model is scored through its own logits."""
    if not FAST.scored_rows_only or not callable(getattr(model, "get_output_embeddings", None)):
        return None
    try:
        return OutputHead.of(model, trainable_ok=True)
    except FedMKTError:  # no linear head, or logits the head alone does not give
        return None


def _without_head(model: Any, **kwargs: Any) -> tuple[Tensor, Any]:
    """Final hidden states and output of a forward whose output head is skipped (see `fedmkt.head`)."""
    return forward_without_head(model, call=lambda **inputs: _call(model, **inputs), **kwargs)


class _PendingHeadRows:
    """Hidden rows waiting for the output head, sent through it together so that its chunks are full.

    The head's weight is read whole for every call: at Gemma-3's 262,144 tokens a call for the few
    prompt rows of one batch costs nearly what a full 64-row chunk does. So rows from several
    batches queue here, and each label's log-probability is added to its answer option's score.
    """

    def __init__(self, head: OutputHead, scores: Tensor) -> None:
        self.head, self.scores = head, scores
        self._clear()

    def _clear(self) -> None:
        self.hidden: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.reads: list[Tensor] = []
        self.pairs: list[Tensor] = []
        self.rows = 0

    def add(self, hidden: Tensor, labels: Tensor, reads: Tensor, pairs: Tensor) -> None:
        """Score `labels` [N] at rows `reads` [N] of `hidden` [M, H], adding to the options `pairs` [N]."""
        self.hidden.append(hidden)
        self.labels.append(labels)
        self.reads.append(reads + self.rows)
        self.pairs.append(pairs.cpu())
        self.rows += hidden.shape[0]
        if self.rows >= 4 * self.head.rows_per_chunk:
            self.flush()

    def flush(self) -> None:
        if not self.hidden:
            return
        logprobs = head_label_logprobs(
            self.head, torch.cat(self.hidden), torch.cat(self.labels), rows=torch.cat(self.reads)
        )
        self.scores.index_add_(0, torch.cat(self.pairs), logprobs.double().cpu())
        self._clear()


def _summed_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over positions of log p(target); targets equal to -100 count zero. [B, K, V], [B, K] -> [B]."""
    mask = targets != IGNORE_INDEX
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1).double().cpu()


# no_grad, not inference_mode: an FSDP2 model's all-gather buffers first filled in inference mode
# become inference tensors, which the party's later training can no longer write into.
@torch.no_grad()
def _score_pairs(
    model: Any,
    encoded: list[tuple[Tensor, Tensor]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar: Any = None,
) -> Tensor:
    """Summed log-probability of each answer given its prompt, one full forward per (prompt, answer)."""
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = torch.zeros(len(encoded), dtype=torch.float64)
    head = _output_head(model)
    pending = _PendingHeadRows(head, scores) if head is not None else None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i][0], "targets": encoded[i][1]} for i in rows], pad_id)
        targets = batch["targets"].to(device)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if pending is not None:  # the head on the scored positions only
            hidden, _ = _without_head(model, **inputs)
            scored = targets != IGNORE_INDEX
            picked = hidden[scored]
            pairs = torch.tensor(rows)[scored.nonzero()[:, 0].cpu()]
            pending.add(picked, targets[scored], torch.arange(len(picked), device=device), pairs)
        else:
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
            logits, _ = _logits_at(model, keep, **inputs)
            scores[rows] = _summed_logprobs(logits, targets[:, keep])
        if bar is not None:
            bar.update(len(rows))
    if pending is not None:
        pending.flush()
    return scores


class _NoPromptCache(Exception):
    """The model returned no key/value cache that can be expanded over answer options."""


@dataclass
class _PromptGroup:
    """Answer options that share the same (possibly truncated) prompt tokens."""

    prompt: Tensor
    pairs: list[int] = field(default_factory=list)
    continuations: list[Tensor] = field(default_factory=list)


def _group_by_prompt(encoded: list[tuple[Tensor, Tensor]], sizes: list[int]) -> list[_PromptGroup]:
    groups: list[_PromptGroup] = []
    pair = 0
    for size in sizes:
        by_prompt: dict[tuple[int, ...], _PromptGroup] = {}
        for input_ids, targets in encoded[pair : pair + size]:
            cut = int((targets != IGNORE_INDEX).nonzero()[0]) + 1  # prompt = tokens up to the first predictor
            group = by_prompt.setdefault(tuple(input_ids[:cut].tolist()), _PromptGroup(input_ids[:cut]))
            group.pairs.append(pair)
            group.continuations.append(input_ids[cut:])
            pair += 1
        groups.extend(by_prompt.values())
    return groups


@torch.no_grad()  # see _score_pairs
def _score_shared_prompts(
    model: Any,
    encoded: list[tuple[Tensor, Tensor]],
    sizes: list[int],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    bar: Any = None,
) -> Tensor:
    """Same scores as `_score_pairs`, running each prompt once instead of once per answer option.

    The prompts of a batch run first (right-padded) and leave their key/value cache; the cache is
    copied once per option and the options run as a continuation, attending to their own prompt
    through an attention mask with the prompt padding as holes, at positions that continue each
    prompt. An ARC question (4 options of a few tokens after a ~25-token prompt) costs about a
    third of the tokens; BoolQ/RTE options are one token, which the prompt pass alone scores.
    """
    # Widest option first, then longest prompt: a batch's options are padded to about one width.
    groups = _group_by_prompt(encoded, sizes)
    if FAST.scored_rows_only:
        groups.sort(key=lambda g: (-max(len(c) for c in g.continuations), -len(g.prompt)))
    else:
        groups.sort(key=lambda g: -len(g.prompt))
    scores = torch.zeros(len(encoded), dtype=torch.float64)
    head = _output_head(model)
    pending = _PendingHeadRows(head, scores) if head is not None else None
    start = 0
    while start < len(groups):
        stop, rows = start, 0
        while stop < len(groups) and (stop == start or rows + len(groups[stop].pairs) <= batch_size):
            rows += len(groups[stop].pairs)
            stop += 1
        batch, start = groups[start:stop], stop

        prompts = collate([{"input_ids": g.prompt} for g in batch], pad_id)
        lengths = prompts["attention_mask"].sum(dim=1).to(device)
        prompt_mask = prompts["attention_mask"].to(device)
        last = lengths - 1
        prompt_inputs = {"input_ids": prompts["input_ids"].to(device), "attention_mask": prompt_mask, "use_cache": True}
        if pending is not None:
            hidden, output = _without_head(model, **prompt_inputs)
        else:
            keep = torch.unique(last)
            logits, output = _logits_at(model, keep, **prompt_inputs)
        # transformers >= 5.2x names the cache `cache`; earlier versions `past_key_values`.
        cache_key = "cache" if getattr(output, "cache", None) is not None else "past_key_values"
        cache = getattr(output, cache_key, None)
        if cache is None or not hasattr(cache, "reorder_cache"):
            raise _NoPromptCache
        owner = torch.tensor([i for i, g in enumerate(batch) for _ in g.pairs], device=device)
        pairs = torch.tensor([p for g in batch for p in g.pairs])
        continuations = [c for g in batch for c in g.continuations]
        first_tokens = torch.stack([c[:1] for c in continuations]).to(device)  # [R, 1]
        if pending is not None:  # options of one question share the prompt's last row: one head row each
            at_last_hidden = hidden[torch.arange(len(batch), device=device), last]  # [G, H]
            pending.add(at_last_hidden, first_tokens[:, 0], owner, pairs)
        else:
            at_last = logits[torch.arange(len(batch), device=device), torch.searchsorted(keep, last)]  # [G, V]
            scores[pairs] = _summed_logprobs(at_last[owner].unsqueeze(1), first_tokens)

        width = max(len(c) for c in continuations)
        if width > 1:  # the rest of each option, predicted by its own earlier tokens
            try:  # without explicit positions and the cache, the continuation would be scored wrongly
                if pending is not None:
                    rest, labels, reads, options_of = _option_rest_rows(
                        model, cache, cache_key, owner, continuations, prompt_mask, lengths, pad_id
                    )
                    pending.add(rest, labels, reads, pairs[options_of])
                else:
                    cache.reorder_cache(owner)
                    options = collate([{"input_ids": c} for c in continuations], pad_id)
                    option_ids = options["input_ids"].to(device)
                    option_mask = options["attention_mask"].to(device)
                    rest, _ = _logits_at(
                        model,
                        torch.arange(width - 1, device=device),
                        input_ids=option_ids,
                        attention_mask=torch.cat([prompt_mask[owner], option_mask], dim=1),
                        position_ids=lengths[owner, None] + torch.arange(width, device=device),
                        **{cache_key: cache},
                    )
                    targets = option_ids[:, 1:].masked_fill(option_mask[:, 1:] == 0, IGNORE_INDEX)
                    scores[pairs] += _summed_logprobs(rest, targets)
            except TypeError as error:
                raise _NoPromptCache from error
        if bar is not None:
            bar.update(rows)
    if pending is not None:
        pending.flush()
    return scores


def _option_rest_rows(
    model: Any,
    cache: Any,
    cache_key: str,
    owner: Tensor,
    continuations: list[Tensor],
    prompt_mask: Tensor,
    lengths: Tensor,
    pad_id: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What the head must score for each option's tokens after the first: ``(hidden [M, H],
    labels [N], reads [N], options [N])``, label n predicted at row ``reads[n]`` for option ``options[n]``.

    Continues the prompts' cache with only what is read: options of two or more tokens, without
    their last token (it predicts nothing). A hidden state that several options share (same prompt,
    same tokens so far, e.g. " the red one" and " the blue one" after " the") is kept once.
    """
    device = prompt_mask.device
    longer = [r for r, c in enumerate(continuations) if len(c) > 1]
    runs = owner[torch.tensor(longer, device=device)]
    cache.reorder_cache(runs)
    options = collate([{"input_ids": continuations[r][:-1]} for r in longer], pad_id)
    option_ids = options["input_ids"].to(device)
    width = option_ids.shape[1]
    hidden, _ = _without_head(
        model,
        input_ids=option_ids,
        attention_mask=torch.cat([prompt_mask[runs], options["attention_mask"].to(device)], dim=1),
        position_ids=lengths[runs, None] + torch.arange(width, device=device),
        **{cache_key: cache},
    )
    owners = owner.tolist()
    row_of: dict[tuple[int, tuple[int, ...]], int] = {}  # (prompt, option tokens so far) -> row
    positions, reads, labels, options_of = [], [], [], []
    for run, r in enumerate(longer):
        tokens = continuations[r].tolist()
        for j in range(len(tokens) - 1):
            key = (owners[r], tuple(tokens[: j + 1]))
            if key not in row_of:
                row_of[key] = len(positions)
                positions.append(run * width + j)
            reads.append(row_of[key])
            labels.append(tokens[j + 1])
            options_of.append(r)
    rows = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(positions, device=device)]
    return rows, torch.tensor(labels, device=device), torch.tensor(reads, device=device), torch.tensor(options_of)


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    batch_size: int = 8,
    max_length: int = 512,
    device: torch.device | str | None = None,
    share_prompt: bool = True,
    progress: Optional[str] = None,
) -> list[Tensor]:
    """For each example, the summed log-likelihood of every choice continuation ([num_choices] each).

    Batched over (example, choice) pairs, `batch_size` pairs per forward. With `share_prompt` each
    prompt runs once and its key/value cache serves all of its options (falls back to one full
    forward per pair for models without an expandable cache). The model is put in eval mode and
    given back in the mode it came in, so this can run mid-training. `progress` labels a progress
    bar over the answer options (none without it).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    encoded = [
        encode_prompt_answer(tokenizer, example.prompt, choice, max_length)
        for example in examples
        for choice in example.choices
    ]
    sizes = [len(example.choices) for example in examples]
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    bar = _progress(len(encoded), progress)
    try:
        flat = None
        if share_prompt:
            try:
                flat = _score_shared_prompts(model, encoded, sizes, batch_size, pad_id, device, bar)
            except _NoPromptCache:
                flat = None
                if bar is not None:
                    bar.reset()
        if flat is None:
            flat = _score_pairs(model, encoded, batch_size, pad_id, device, bar)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return list(flat.split(sizes))


def completion_len(prompt: str, continuation: str) -> int:
    """Characters of an option as lm-eval's acc_norm counts them: without the space joining it to the prompt."""
    joined = continuation.startswith(" ") and not prompt[-1:].isspace()
    return max(1, len(continuation) - 1) if joined else max(1, len(continuation))


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    examples: list[QAExample],
    batch_size: int = 8,
    max_length: int = 512,
    device: torch.device | str | None = None,
    share_prompt: bool = True,
    progress: Optional[str] = None,
) -> dict[str, Any]:
    """`{"acc", "acc_norm", "n", "acc_ci", "correct"}` of `model` on `examples` (see the module docstring).

    `correct` holds one character per example, in order, "1" where the `acc` answer is right and
    "0" where not: the per-question record that paired comparisons of two models need.
    """
    if not examples:
        raise FedMKTError("No examples to evaluate. Fix: give the task a non-empty evaluation split (eval_size > 0).")
    loglikelihoods = choice_loglikelihoods(
        model, tokenizer, examples, batch_size, max_length, device, share_prompt, progress
    )
    # Never synced: under DDP rank 0 scores alone (a sync would wait forever); under FSDP every rank
    # scores all questions in lock-step and already holds the same numbers.
    acc, acc_norm = MeanMetric(sync_on_compute=False), MeanMetric(sync_on_compute=False)
    hits = []
    for example, scores in zip(examples, loglikelihoods):
        lengths = torch.tensor([completion_len(example.prompt, c) for c in example.choices], dtype=torch.float64)
        hits.append(int(scores.argmax()) == example.answer_index)
        acc.update(float(hits[-1]))
        acc_norm.update(float(int((scores / lengths).argmax()) == example.answer_index))
    accuracy = float(acc.compute())
    correct = round(accuracy * len(examples))
    return {
        "acc": accuracy,
        "acc_norm": float(acc_norm.compute()),
        "n": len(examples),
        "acc_ci": list(wilson_interval(correct, len(examples))),
        "correct": "".join("1" if hit else "0" for hit in hits),
    }


def pool_scores(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The scores of several held-out sets as one set's: each mean weighted by its set's size, the
    interval from the pooled count, the per-question record concatenated in the sets' order."""
    n = sum(part["n"] for part in parts)
    if "acc" not in parts[0]:
        return {
            "rouge_l": sum(part["rouge_l"] * part["n"] for part in parts) / n,
            "exact_match": sum(part["exact_match"] * part["n"] for part in parts) / n,
            "n": n,
        }
    correct = "".join(part["correct"] for part in parts)
    hits = correct.count("1")
    return {
        "acc": hits / n,
        "acc_norm": sum(part["acc_norm"] * part["n"] for part in parts) / n,
        "n": n,
        "acc_ci": list(wilson_interval(hits, n)),
        "correct": correct,
    }


def summary_keys(scores: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An evaluation function's scores under summary.json's keys (`eval_accuracy`, `own_eval_rouge_l`, ...)."""
    if "rouge_l" in scores:
        return {
            f"{prefix}_rouge_l": scores["rouge_l"],
            f"{prefix}_exact_match": scores["exact_match"],
            f"{prefix}_n": scores["n"],
        }
    return {
        f"{prefix}_accuracy": scores["acc"],
        f"{prefix}_accuracy_norm": scores["acc_norm"],
        f"{prefix}_n": scores["n"],
        f"{prefix}_accuracy_ci": scores["acc_ci"],
        f"{prefix}_correct": scores["correct"],
    }


def held_out_scores(
    score: Callable[[list, str], dict[str, Any]],
    evaluation: list,
    named: Optional[dict[str, list]] = None,
) -> dict[str, Any]:
    """The `eval_*` keys of one model: on `evaluation`, or with named held-out sets on each of them
    (`eval_<name>_*`) and pooled (`eval_*`, each question scored once). `score(examples, what)` is
    the evaluation function, `what` naming the set for progress bars."""
    if not named:
        return summary_keys(score(evaluation, "evaluate"), "eval")
    parts = {name: score(examples, f"evaluate {name}") for name, examples in named.items()}
    keys = summary_keys(pool_scores(list(parts.values())), "eval")
    for name, scores in parts.items():
        keys |= summary_keys(scores, f"eval_{name}")
    return keys


@torch.no_grad()  # see _score_pairs
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int = 8,
    max_length: int = 512,
    max_new_tokens: int = 32,
    device: torch.device | str | None = None,
    progress: Optional[str] = None,
) -> list[str]:
    """Greedy continuations of `prompts`, cut at the first newline (an answer is one line).

    Prompts are tokenised as in training (leading specials, left truncation to leave room for the
    answer) and left-padded so every row's next token sits at the same position. A sequence stops
    at its first newline or end-of-sequence token, and a batch as soon as all of its sequences have.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    bar = _progress(len(prompts), progress)
    texts: list[str] = [""] * len(prompts)
    try:
        encoded = []
        for prompt in prompts:
            ids, lead = prompt_ids(tokenizer, prompt)
            room = max(max_length - max_new_tokens, lead + 1)
            encoded.append(ids if len(ids) <= room else ids[:lead] + ids[len(ids) - (room - lead) :])
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **({"stop_strings": ["\n"], "tokenizer": tokenizer} if FAST.stop_at_newline else {}),
            )
            for row, i in enumerate(rows):
                text = tokenizer.decode(output[row, width:], skip_special_tokens=True)
                texts[i] = text.split("\n", 1)[0].strip()
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return texts


def _normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after `_normalise_answer`."""
    if len(predictions) != len(references) or not predictions:
        raise FedMKTError(
            f"exact_match got {len(predictions)} predictions for {len(references)} references. Fix: pass one per reference."
        )
    return sum(_normalise_answer(p) == _normalise_answer(r) for p, r in zip(predictions, references)) / len(predictions)


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: list[GenerationExample],
    batch_size: int = 8,
    max_length: int = 512,
    max_new_tokens: int = 32,
    device: torch.device | str | None = None,
    progress: Optional[str] = None,
) -> dict[str, Any]:
    """`{"rouge_l", "exact_match", "n"}` of greedy answers to `examples` against their responses."""
    if not examples:
        raise FedMKTError("No examples to evaluate. Fix: give the run a non-empty evaluation set.")
    predictions = generate_greedy(
        model, tokenizer, [e.prompt for e in examples], batch_size, max_length, max_new_tokens, device, progress
    )
    references = [e.response.strip() for e in examples]
    return {
        "rouge_l": rouge_l(predictions, references),
        "exact_match": exact_match(predictions, references),
        "n": len(examples),
    }


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
