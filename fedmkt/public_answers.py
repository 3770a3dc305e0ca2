"""A party's own answers to the public questions, for a public set without labels.

Each party answers every public question itself (the spec's step 1): multiple choice, the option
with the highest summed log-likelihood (evaluation's `acc` rule); generation, its greedy answer
to the first newline or `max_new_tokens`. It then shares along that answer as along a gold one.
The per-option NLLs of a multiple-choice pass are kept: they are also the party's own loss on any
answer a teacher gives, which DualMinCE needs (`OwnAnswers.nll_per_byte`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fedmkt.data.examples import Example, Format, QAExample
from fedmkt.evaluation import choice_loglikelihoods, generate_greedy

__all__ = ["OwnAnswers", "answer_public", "text_bytes"]


def text_bytes(text: str) -> int:
    """UTF-8 bytes of an answer text: the unit losses are compared in across tokenizers."""
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class OwnAnswers:
    """One party's answers to the public questions, with what it scored to choose them."""

    texts: list[Optional[str]]
    """Per public sample, the answer as a continuation of the prompt (None: an empty generation)."""

    option_nll: Optional[list[torch.Tensor]] = None
    """Multiple choice: per sample, minus the summed log-likelihood of each option."""

    def nll_per_byte(self, index: int, example: QAExample, answer: str) -> float:
        """This party's NLL of `answer` (one of the sample's options) per UTF-8 byte."""
        assert self.option_nll is not None
        return float(self.option_nll[index][example.choices.index(answer)]) / text_bytes(answer)

    def accuracy_against(self, gold: list[Example]) -> float:
        """How often these answers equal the gold ones (the `public_answer_accuracy` diagnostic)."""
        hits = [text is not None and text.strip() == example.answer.strip() for text, example in zip(self.texts, gold)]
        return sum(hits) / len(hits) if hits else float("nan")


def _continuation(prompt: str, text: str) -> str:
    return text if prompt[-1:].isspace() else f" {text}"


def answer_public(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    data_format: Format,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    device: Optional[torch.device] = None,
    progress: Optional[str] = None,
) -> OwnAnswers:
    """The party's own answer to every public question (see the module docstring)."""
    if data_format == "multiple_choice":
        scores = choice_loglikelihoods(model, tokenizer, examples, batch_size, max_length, device, progress=progress)
        texts = [example.choices[int(score.argmax())] for example, score in zip(examples, scores)]
        return OwnAnswers(list(texts), [-score for score in scores])
    generated = generate_greedy(
        model, tokenizer, [e.prompt for e in examples], batch_size, max_length, max_new_tokens, device, progress
    )
    return OwnAnswers([_continuation(e.prompt, text) if text else None for e, text in zip(examples, generated)])
