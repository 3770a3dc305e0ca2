"""Sequence alignment of two tokenisations of the same text by dynamic time warping (DTW).

The cost of pairing two tokens is the Levenshtein distance between their (normalised) strings.
Distances come from ``rapidfuzz.process.cdist`` over the *distinct* tokens of each side only
(texts repeat tokens a lot: a 512-token text has about 260 distinct ones, so a quarter of the
distance computations), and the O(n*m) recurrence plus backtrace run in a compiled Numba kernel
that reads the small distinct-token matrix through index arrays: together far faster than a
pure-Python double loop, with the identical path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

__all__ = ["cost_matrix", "dtw_path", "one_to_one_matches"]


def _distinct(tokens: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct tokens in first-seen order, and each position's index into them."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in tokens), dtype=np.int64, count=len(tokens))
    return list(index), inverse


def _distinct_costs(a: Sequence[str], b: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ua, inv_a = _distinct(a)
    ub, inv_b = _distinct(b)
    small = process.cdist(ua, ub, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    return small, inv_a, inv_b


def cost_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Levenshtein distance between every token of ``a`` and every token of ``b`` (int64 [n, m])."""
    small, inv_a, inv_b = _distinct_costs(a, b)
    return small.astype(np.int64)[inv_a][:, inv_b]


@numba.njit(cache=True, nogil=True)
def _dtw_kernel(small: np.ndarray, inv_a: np.ndarray, inv_b: np.ndarray) -> np.ndarray:  # pragma: no cover
    """DTW on the cost ``small[inv_a[i], inv_b[j]]``; returns the path as an int64 [len, 2] array."""
    n = inv_a.shape[0]
    m = inv_b.shape[0]
    acc = np.empty((n, m), dtype=np.int64)
    row_a = small[inv_a[0]]
    acc[0, 0] = row_a[inv_b[0]]
    for j in range(1, m):
        acc[0, j] = row_a[inv_b[j]] + acc[0, j - 1]
    for i in range(1, n):
        row_a = small[inv_a[i]]
        acc[i, 0] = row_a[inv_b[0]] + acc[i - 1, 0]
        for j in range(1, m):
            best = acc[i - 1, j - 1]
            if acc[i - 1, j] < best:
                best = acc[i - 1, j]
            if acc[i, j - 1] < best:
                best = acc[i, j - 1]
            acc[i, j] = row_a[inv_b[j]] + best
    path = np.empty((n + m - 1, 2), dtype=np.int64)
    i, j, k = n - 1, m - 1, 0
    while True:
        path[k, 0] = i
        path[k, 1] = j
        k += 1
        if i == 0 and j == 0:
            break
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if diag <= up and diag <= left:
                i -= 1
                j -= 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
    return path[:k][::-1].copy()


def _path_array(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.empty((0, 2), dtype=np.int64)
    return _dtw_kernel(*_distinct_costs(a, b))


def dtw_path(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """DTW alignment path between token sequences ``a`` and ``b``.

    ``D[i, j] = cost(i, j) + min(D[i-1, j-1], D[i-1, j], D[i, j-1])`` with ``cost`` the Levenshtein
    distance between token strings. The backtrace starts at ``(n-1, m-1)`` and on ties prefers the
    diagonal, then up (``i-1``), then left (``j-1``), so the path is unique. Returned from
    ``(0, 0)`` to ``(n-1, m-1)``; empty when either sequence is empty.
    """
    return list(map(tuple, _path_array(a, b).tolist()))


def one_to_one_matches(teacher: Sequence[str], receiver: Sequence[str]) -> np.ndarray:
    """For each receiver position, the teacher position it is matched to one-to-one, or -1.

    A pair ``(j, i)`` on the DTW path is one-to-one when receiver position ``i`` pairs with no
    other teacher position and teacher position ``j`` with no other receiver position. Anything
    else is many-to-one in one direction or the other and gets -1: when ``"▁quic", "k"`` both
    pair with ``"▁quick"``, the teacher's distribution after ``"▁quick"`` is the right target for
    neither ``"▁quic"`` (whose next token is ``"k"``) nor, in general, a leading ``<bos>`` that
    DTW folds onto the first word.
    """
    out = np.full(len(receiver), -1, dtype=np.int64)
    path = _path_array(teacher, receiver)
    if len(path) == 0:
        return out
    receiver_degree = np.bincount(path[:, 1], minlength=len(receiver))
    teacher_degree = np.bincount(path[:, 0], minlength=len(teacher))
    single = (receiver_degree[path[:, 1]] == 1) & (teacher_degree[path[:, 0]] == 1)
    out[path[single, 1]] = path[single, 0]
    return out
