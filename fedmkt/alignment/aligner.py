"""Per-sample token alignment of a teacher's top-k logits to a receiver's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from fedmkt.alignment.reindex import align_topk
from fedmkt.alignment.sequence import end_offsets, offset_matches, one_to_one_matches
from fedmkt.alignment.tokens import token_bytes, vocab_strings
from fedmkt.alignment.vocab_map import load_or_build_vocab_map_hit

__all__ = ["TokenAligner"]


class TokenAligner:
    """Aligns one teacher tokenizer's top-k outputs to one receiver tokenizer.

    Holds what is fixed for the pair, computed once: the MinED vocabulary map teacher id ->
    receiver id (from the on-disk cache when present; ``vocab_map_cached`` says whether it was),
    both tokenizers' normalised token strings (which DTW compares) and the bytes each token stands
    for (which give its end offset).
    ``sequence_alignment``: ``"offsets"`` matches positions whose tokens end at the same byte of
    the text (exact, no dynamic programming); ``"dtw"`` keeps the one-to-one DTW pairs that also
    end at the same byte (a subset of ``"offsets"``).
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        receiver_tokenizer: Any,
        cache_dir: str | Path,
        sequence_alignment: Literal["dtw", "offsets"] = "offsets",
    ) -> None:
        if sequence_alignment not in ("dtw", "offsets"):
            raise ValueError(f"sequence_alignment must be 'dtw' or 'offsets', got {sequence_alignment!r}")
        self.sequence_alignment = sequence_alignment
        self.teacher_tokenizer = teacher_tokenizer
        self.receiver_tokenizer = receiver_tokenizer
        self.teacher_strings = vocab_strings(teacher_tokenizer)
        self.receiver_strings = vocab_strings(receiver_tokenizer)
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.receiver_bytes = token_bytes(receiver_tokenizer)
        self.last_positions = 0
        """Receiver positions of the last `align` call."""
        self.last_matched = 0
        """Of those, positions matched one-to-one to a teacher position."""
        self.vocab_map, self.vocab_map_cached = load_or_build_vocab_map_hit(
            teacher_tokenizer,
            receiver_tokenizer,
            cache_dir,
            src_strings=self.teacher_strings,
            dst_strings=self.receiver_strings,
        )

    @staticmethod
    def _spell(strings: list[str], ids: Tensor) -> list[str]:
        size = len(strings)
        return [strings[i] if 0 <= i < size else "" for i in ids.reshape(-1).tolist()]

    @staticmethod
    def _pieces(table: list[bytes], ids: Tensor) -> list[bytes]:
        size = len(table)
        return [table[i] if 0 <= i < size else b"" for i in ids.reshape(-1).tolist()]

    def teacher_pieces(self, ids: Tensor) -> list[bytes]:
        """The text bytes of each teacher token (``b""`` for special tokens)."""
        return self._pieces(self.teacher_bytes, ids)

    def receiver_pieces(self, ids: Tensor) -> list[bytes]:
        """The text bytes of each receiver token (``b""`` for special tokens)."""
        return self._pieces(self.receiver_bytes, ids)

    def end_offsets(self, teacher_input_ids: Tensor, receiver_input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Byte offset where each teacher / receiver token ends in the shared text (-1/-2: past it)."""
        t_ends, r_ends = end_offsets(
            self._pieces(self.teacher_bytes, teacher_input_ids), self._pieces(self.receiver_bytes, receiver_input_ids)
        )
        return torch.from_numpy(t_ends), torch.from_numpy(r_ends)

    def match_positions(self, teacher_input_ids: Tensor, receiver_input_ids: Tensor) -> Tensor:
        """``[Ls]`` long: the teacher position matched one-to-one to each receiver position, or -1."""
        t_ends, r_ends = self.end_offsets(teacher_input_ids, receiver_input_ids)
        if self.sequence_alignment == "offsets":
            return torch.from_numpy(offset_matches(t_ends.numpy(), r_ends.numpy()))
        teacher = self._spell(self.teacher_strings, teacher_input_ids)
        receiver = self._spell(self.receiver_strings, receiver_input_ids)
        return torch.from_numpy(one_to_one_matches(teacher, receiver, t_ends.numpy(), r_ends.numpy()))

    def align(
        self,
        teacher_input_ids: list[Tensor],
        teacher_topk_ids: list[Tensor],
        teacher_topk_logits: list[Tensor],
        receiver_input_ids: list[Tensor],
        temperature: float = 1.0,
        teacher_logsumexp: Optional[list[Tensor]] = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Receiver-side ``(ids [Ls, k], probs [Ls, k])`` targets for each public sample.

        Inputs are per sample and unpadded. Position ``j``'s logits predict token ``j + 1``. A
        receiver position ``i`` matched to teacher position ``j`` (see :meth:`match_positions`) gets the teacher's
        top-k at ``j`` mapped through the vocabulary map; any other position gets a one-hot on the
        receiver's own *next* token ``receiver_input_ids[i + 1]`` (the last position, which has
        no next token, gets an empty row: ids -1, probabilities 0). The reference implementation
        one-hots the *current* token there, which is off by one for next-token targets; we use
        the next token on purpose. With `teacher_logsumexp` (per sample, ``[Lt]``) matched rows
        carry the teacher's true probabilities and leave it a tail (see `align_topk`).
        """
        lists = [teacher_input_ids, teacher_topk_ids, teacher_topk_logits, receiver_input_ids]
        if teacher_logsumexp is not None:
            lists.append(teacher_logsumexp)
        counts = {len(entries) for entries in lists}
        if len(counts) != 1:
            raise ValueError(f"align() needs one entry per sample in every list, got lengths {sorted(counts)}")
        out: list[tuple[Tensor, Tensor]] = []
        self.last_positions = self.last_matched = 0
        for sample, (t_ids, top_ids, top_logits, r_ids) in enumerate(zip(*lists[:4])):
            r_ids = r_ids.reshape(-1).long()
            matched = self.match_positions(t_ids, r_ids)
            self.last_positions += len(matched)
            self.last_matched += int((matched >= 0).sum())
            fallback = torch.full_like(r_ids, -1)
            fallback[:-1] = r_ids[1:]
            lse = None if teacher_logsumexp is None else teacher_logsumexp[sample]
            out.append(align_topk(top_ids, top_logits, matched, self.vocab_map, fallback, temperature, lse))
        return out
