"""A receiver's distillation targets, in the method's order: select the samples, then align them.

`select_teachers` runs DualMinCE on the losses the teachers' payloads report; `TeacherAligners`
maps only the selected samples' top-k logits onto the receiver's tokens. `Participant.distill`
calls both before it builds its distillation data, which nothing changes afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmkt.alignment import TokenAligner
from fedmkt.data.datamodule import DistillationTargets, TokenizedSample
from fedmkt.errors import FedMKTError
from fedmkt.payload import KnowledgePayload
from fedmkt.selection import Selection, dual_min_ce


def teacher_losses(payloads: Mapping[str, KnowledgePayload], num_public: int) -> dict[str, torch.Tensor]:
    """Each teacher's per-sample CE over the whole public set, +inf where it did not score a sample.

    A teacher that scored only part of the set (e.g. a client that failed midway) is thereby never
    chosen for the samples it skipped.
    """
    losses = {}
    for name, payload in payloads.items():
        row = torch.full((num_public,), float("inf"))
        row[payload.sample_index.long()] = payload.losses.float()
        losses[name] = row
    return losses


def select_teachers(
    own_losses: torch.Tensor, payloads: Mapping[str, KnowledgePayload], require_improvement: bool = True
) -> Selection:
    """Which public samples the receiver distills and from which teacher (DualMinCE, or "all")."""
    return dual_min_ce(own_losses, teacher_losses(payloads, len(own_losses)), require_improvement)


@dataclass(frozen=True)
class AlignmentCacheStats:
    """How one `align_selected` call got its aligners, and what the alignment cost.

    A first build of a vocabulary map between real tokenizers takes seconds to minutes; these
    counts tell a slow phase that built maps from one that only reused them.
    """

    hits: int = 0
    """Teachers whose aligner was already in memory (an earlier round) or whose map was on disk."""

    misses: int = 0
    """Teachers whose vocabulary map was built now (and written to the cache)."""

    samples: int = 0
    """Selected samples aligned."""

    seconds: float = 0.0
    """Wall time of the call, map builds included."""

    positions: int = 0
    """Receiver positions of the selected samples."""

    matched: int = 0
    """Of those, positions matched one-to-one to a teacher position (the rest get a one-hot on the next token)."""


class TeacherAligners:
    """One receiver's `TokenAligner` per teacher, built on first use and kept across rounds.

    A vocabulary map is built once per (teacher, receiver) tokenizer pair and cached on disk under
    `cache_dir`, keyed by tokenizer content, so later runs and renamed models reuse it.
    `last_alignment` records how the latest `align_selected` call used this cache.
    """

    def __init__(
        self,
        receiver_tokenizer: Any,
        teacher_tokenizers: Mapping[str, Any],
        cache_dir: str | Path,
        temperature: float = 1.0,
        sequence_alignment: str = "offsets",
        topk_target: str = "renormalize",
    ) -> None:
        self.receiver_tokenizer = receiver_tokenizer
        self.teacher_tokenizers = teacher_tokenizers
        self.cache_dir = Path(cache_dir)
        self.temperature = temperature
        self.sequence_alignment = sequence_alignment
        self.topk_target = topk_target
        self._aligners: dict[str, TokenAligner] = {}
        self.last_alignment = AlignmentCacheStats()

    def aligner(self, teacher: str) -> TokenAligner:
        """The aligner from `teacher`'s tokenizer to the receiver's."""
        if teacher not in self._aligners:
            self._aligners[teacher] = TokenAligner(
                self.teacher_tokenizers[teacher], self.receiver_tokenizer, self.cache_dir, self.sequence_alignment
            )
        return self._aligners[teacher]

    def align_selected(
        self, selection: Selection, payloads: Mapping[str, KnowledgePayload], public: list[TokenizedSample]
    ) -> DistillationTargets:
        """Aligned top-k targets for the selected samples (None for the others).

        Unselected samples are never aligned, and a teacher no sample chose is never loaded.
        """
        start = time.perf_counter()
        hits = misses = samples = positions = matched = 0
        targets = DistillationTargets.empty(len(public))
        for teacher_index, teacher in enumerate(selection.teachers):
            chosen = (selection.teacher_of_sample == teacher_index).nonzero().flatten().tolist()
            if not chosen:
                continue
            if teacher in self._aligners or self.aligner(teacher).vocab_map_cached:
                hits += 1
            else:
                misses += 1
            samples += len(chosen)
            payload = payloads[teacher]
            row_of_sample = {int(sample): row for row, sample in enumerate(payload.sample_index.tolist())}
            rows = [payload.sample(row_of_sample[i]) for i in chosen]
            if self.topk_target == "tail" and payload.temperature != self.temperature:
                raise FedMKTError(
                    f"{teacher}'s log-sum-exp was taken at temperature {payload.temperature}, this party distills at "
                    f"{self.temperature}. Fix: give every party the same transfer.temperature."
                )
            aligned = self.aligner(teacher).align(
                [row[0] for row in rows],
                [row[1] for row in rows],
                [row[2] for row in rows],
                [public[i].input_ids for i in chosen],
                temperature=self.temperature,
                teacher_logsumexp=(
                    [payload.logsumexp_of(row_of_sample[i]) for i in chosen] if self.topk_target == "tail" else None
                ),
            )
            for i, (ids, probs) in zip(chosen, aligned):
                targets.ids[i], targets.probs[i] = ids.long(), probs.float()
            positions += self.aligner(teacher).last_positions
            matched += self.aligner(teacher).last_matched
        self.last_alignment = AlignmentCacheStats(
            hits, misses, samples, time.perf_counter() - start, positions, matched
        )
        return targets
