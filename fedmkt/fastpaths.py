"""Switches between the fast code paths and the plain ones they replaced.

Every fast path gives the same results as its plain one (tests hold them to it); the switches exist
so that `benchmarks/round_speed.py` can time each against the path it replaced in one command, and
so tests can use the plain path as a reference. Runs never change them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

__all__ = ["FastPaths", "FAST", "plain"]


@dataclass
class FastPaths:
    """Which fast paths are on (all of them, unless a benchmark or test turns one off)."""

    chunked_head: bool = True
    """Training and sharing run the output head a chunk of rows at a time on the rows a loss or
    payload reads (`fedmkt.head`); off: full [B, L, V] logits, then the losses on them."""

    scored_rows_only: bool = True
    """Evaluation runs the output head only on the positions it scores, once per distinct hidden
    state (options of a question share the prompt's last one, and any common first tokens), in
    full chunks across batches; options run without their last token and are batched by width.
    Off: logits at every kept column of the batch, options batched by prompt length."""

    sorted_public: bool = True
    """The public-logit pass batches samples of similar length; off: in sample order."""

    stop_at_newline: bool = True
    """Generation stops each sequence at its first newline; off: every sequence decodes
    `max_new_tokens` tokens and is cut at the newline afterwards."""


FAST = FastPaths()
"""The switches the code reads."""


@contextmanager
def plain(*names: str) -> Iterator[FastPaths]:
    """Turn the named fast paths off (all of them without names) inside a `with` block."""
    chosen = names or tuple(f.name for f in fields(FastPaths))
    unknown = set(chosen) - {f.name for f in fields(FastPaths)}
    if unknown:
        raise ValueError(f"unknown fast paths {sorted(unknown)}")
    saved = {name: getattr(FAST, name) for name in chosen}
    try:
        for name in chosen:
            setattr(FAST, name, False)
        yield FAST
    finally:
        for name, value in saved.items():
            setattr(FAST, name, value)
