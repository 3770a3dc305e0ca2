"""The two kinds of example a federation trains and scores on, and what makes two examples the same.

A multiple-choice example is scored by the log-likelihood of each option (`QAExample`); a generation
example by the text the model writes (`GenerationExample`). Both train the same way: cross-entropy
on `answer`, the continuation that follows `prompt`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Union

__all__ = ["QAExample", "GenerationExample", "Example", "Format", "format_of", "content_key"]

Format = Literal["multiple_choice", "generation"]


@dataclass(frozen=True)
class QAExample:
    """One question: the prompt, its answer options as continuations (leading space), the gold index."""

    uid: str
    prompt: str
    choices: tuple[str, ...]
    answer_index: int

    @property
    def answer(self) -> str:
        return self.choices[self.answer_index]


@dataclass(frozen=True)
class GenerationExample:
    """One prompt and the reference response that continues it (leading space, as trained on)."""

    uid: str
    prompt: str
    response: str

    @property
    def answer(self) -> str:
        return self.response


Example = Union[QAExample, GenerationExample]


def format_of(example: Example) -> Format:
    """`multiple_choice` or `generation`: how the example is scored."""
    return "multiple_choice" if isinstance(example, QAExample) else "generation"


_SPACES = re.compile(r"\s+")


def content_key(example: Example) -> str:
    """The example's text, normalised (Unicode NFKC, case-folded, runs of whitespace as one space).

    Two examples with the same key are the same question to a model whatever their ids, which is
    what the evaluation/training overlap check compares.
    """
    parts = [example.prompt, *example.choices] if isinstance(example, QAExample) else [example.prompt, example.response]
    return "\x1f".join(_SPACES.sub(" ", unicodedata.normalize("NFKC", p)).strip().casefold() for p in parts)
