"""Minimum-edit-distance (MinED) nearest-token search between two vocabularies.

For every source string, find the destination index with the smallest Levenshtein distance.
Ties are broken by the longest common prefix with the source (the candidate that starts like the
source token is the better substitute), then by the smallest destination index, so the result is
deterministic. Empty destination strings are never candidates; an empty source maps to -1.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

__all__ = ["nearest_tokens"]

_CHUNK = 512
_MAX_CHAR = "\U0010ffff"


def _prefix_range(sorted_strings: list[str], prefix: str) -> tuple[int, int]:
    lo = bisect.bisect_left(sorted_strings, prefix)
    hi = bisect.bisect_left(sorted_strings, prefix + _MAX_CHAR, lo)
    return lo, hi


def nearest_tokens(src: Sequence[str], dst: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, distances)``, both int64 of shape ``[len(src)]`` (-1 where no candidate)."""
    ids = np.full(len(src), -1, dtype=np.int64)
    dists = np.full(len(src), -1, dtype=np.int64)
    cand = np.array([i for i, tok in enumerate(dst) if tok], dtype=np.int64)
    if len(cand) == 0:
        return ids, dists
    exact: dict[str, int] = {}
    for i in cand.tolist():
        exact.setdefault(dst[i], i)

    pending: dict[str, list[int]] = {}
    for i, tok in enumerate(src):
        if not tok:
            continue
        hit = exact.get(tok)
        if hit is not None:
            ids[i], dists[i] = hit, 0
        else:
            pending.setdefault(tok, []).append(i)

    cand_strings = [dst[i] for i in cand.tolist()]
    order = np.argsort(np.array(cand_strings, dtype=object), kind="stable")
    sorted_strings = [cand_strings[i] for i in order.tolist()]
    queries = list(pending)
    for start in range(0, len(queries), _CHUNK):
        chunk = queries[start : start + _CHUNK]
        matrix = process.cdist(
            chunk, cand_strings, scorer=Levenshtein.distance, dtype=np.int32, workers=-1
        )
        best = matrix.min(axis=1)
        for row, query in enumerate(chunk):
            tied = matrix[row] == best[row]
            choice = -1
            for length in range(len(query), 0, -1):
                lo, hi = _prefix_range(sorted_strings, query[:length])
                if hi > lo:
                    in_range = order[lo:hi][tied[order[lo:hi]]]
                    if len(in_range):
                        choice = int(in_range.min())
                        break
            if choice < 0:
                choice = int(np.flatnonzero(tied)[0])
            for i in pending[query]:
                ids[i], dists[i] = cand[choice], best[row]
    return ids, dists
