"""The two kinds of example a federation trains and scores on, and what makes two examples the same.

A multiple-choice example is scored by the log-likelihood of each option (`QAExample`); a generation
example by the text the model writes (`GenerationExample`). Both train the same way: cross-entropy
on `answer`, the continuation that follows `prompt`.

A public example may come without its answer (`data.public_labels`): a multiple-choice one then has
`answer_index` None, a generation one `response` None, and reading `answer` is an error, so no
code path can train or score on a gold answer it was not given.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

from fedmkt.errors import FedMKTError

__all__ = ["QAExample", "GenerationExample", "Example", "Format", "format_of", "content_key", "without_answer"]

Format = Literal["multiple_choice", "generation"]


@dataclass(frozen=True)
class QAExample:
    """One question: the prompt, its answer options as continuations (leading space), the gold index
    (None: a public question read without its answer)."""

    uid: str
    prompt: str
    choices: tuple[str, ...]
    answer_index: Optional[int]

    @property
    def labelled(self) -> bool:
        return self.answer_index is not None

    @property
    def answer(self) -> str:
        if self.answer_index is None:
            raise FedMKTError(f"example {self.uid!r} has no answer (an unlabelled public question). Fix: report this.")
        return self.choices[self.answer_index]


@dataclass(frozen=True)
class GenerationExample:
    """One prompt and the reference response that continues it (leading space, as trained on)."""

    uid: str
    prompt: str
    response: Optional[str]

    @property
    def labelled(self) -> bool:
        return self.response is not None

    @property
    def answer(self) -> str:
        if self.response is None:
            raise FedMKTError(f"example {self.uid!r} has no answer (an unlabelled public question). Fix: report this.")
        return self.response


Example = Union[QAExample, GenerationExample]


def format_of(example: Example) -> Format:
    """`multiple_choice` or `generation`: how the example is scored."""
    return "multiple_choice" if isinstance(example, QAExample) else "generation"


def without_answer(example: Example) -> Example:
    """The same question with its answer removed (how an unlabelled public set is read)."""
    if isinstance(example, QAExample):
        return replace(example, answer_index=None)
    return replace(example, response=None)


_SPACES = re.compile(r"\s+")


def content_key(example: Example) -> str:
    """The example's text, normalised (Unicode NFKC, case-folded, runs of whitespace as one space).

    Two examples with the same key are the same question to a model whatever their ids, which is
    what the evaluation/training overlap check compares.
    """
    if isinstance(example, QAExample):
        parts = [example.prompt, *example.choices]
    else:  # an unlabelled prompt is keyed by its prompt alone
        parts = [example.prompt] + ([example.response] if example.response is not None else [])
    return "\x1f".join(_SPACES.sub(" ", unicodedata.normalize("NFKC", p)).strip().casefold() for p in parts)
