"""Sequence alignment of two tokenisations of the same text: by character offsets, or by DTW.

Position ``j``'s logits predict token ``j + 1``, so a teacher position can stand in for a receiver
position only when both tokens end at the same place of the text (same prefix, same continuation
to predict). :func:`offset_matches` matches exactly those positions from the tokens' end offsets;
:func:`one_to_one_matches` keeps the DTW pairs that are one-to-one on the path *and* pass that test.

Dynamic time warping (DTW):
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

__all__ = ["cost_matrix", "dtw_path", "end_offsets", "offset_matches", "one_to_one_matches"]


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


def end_offsets(teacher_pieces: Sequence[bytes], receiver_pieces: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Where each token ends in the text both sides encode, as byte offsets (int64).

    ``*_pieces`` are the tokens' UTF-8 bytes (``b""`` for special tokens, which name roles, not
    text). Bytes rather than characters, so a character split over several byte tokens ends only
    at its last byte. A SentencePiece dummy-prefix space that only one side has is discounted.
    When one text is a suffix of the other (a long prompt cut from the left to fit ``max_length``,
    by a different number of bytes on each side) offsets count from the start of the shorter one,
    and tokens that end before it starts get ``-1``. Otherwise, where the two texts part (a
    normaliser that rewrites characters), positions ending past the common prefix get ``-1``
    (teacher) / ``-2`` (receiver). Negative ends never match.
    """
    t_text, r_text = b"".join(teacher_pieces), b"".join(receiver_pieces)
    t_ends = np.cumsum(np.fromiter(map(len, teacher_pieces), dtype=np.int64, count=len(teacher_pieces)))
    r_ends = np.cumsum(np.fromiter(map(len, receiver_pieces), dtype=np.int64, count=len(receiver_pieces)))
    aligned = _same_text(t_text, t_ends, r_text, r_ends)
    if aligned is None and t_text[:1] == b" " and r_text[:1] != b" ":
        aligned = _same_text(t_text[1:], np.maximum(t_ends - 1, 0), r_text, r_ends)
    elif aligned is None and r_text[:1] == b" " and t_text[:1] != b" ":
        aligned = _same_text(t_text, t_ends, r_text[1:], np.maximum(r_ends - 1, 0))
    if aligned is not None:
        return aligned
    common = min(len(t_text), len(r_text))
    if t_text[:common] != r_text[:common]:
        a = np.frombuffer(t_text[:common], dtype=np.uint8)
        b = np.frombuffer(r_text[:common], dtype=np.uint8)
        common = int(np.flatnonzero(a != b)[0])
    return np.where(t_ends <= common, t_ends, -1), np.where(r_ends <= common, r_ends, -2)


def _same_text(
    t_text: bytes, t_ends: np.ndarray, r_text: bytes, r_ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Ends on a common origin when the texts are equal or one is a suffix of the other, else None."""
    if t_text == r_text:
        return t_ends, r_ends
    if len(t_text) > len(r_text) and t_text.endswith(r_text):
        t_ends = t_ends - (len(t_text) - len(r_text))
        return np.where(t_ends >= 0, t_ends, -1), r_ends
    if len(r_text) > len(t_text) and r_text.endswith(t_text):
        r_ends = r_ends - (len(r_text) - len(t_text))
        return t_ends, np.where(r_ends >= 0, r_ends, -2)
    return None


def _last_at_end(ends: np.ndarray) -> np.ndarray:
    """Positions that are the last token ending at their offset (the next token ends later)."""
    last = np.ones(len(ends), dtype=bool)
    last[:-1] = ends[1:] != ends[:-1]
    return last & (ends >= 0)


def offset_matches(teacher_ends: np.ndarray, receiver_ends: np.ndarray) -> np.ndarray:
    """For each receiver position, the teacher position whose token ends at the same offset, or -1.

    Only the last token ending at an offset on each side takes part: a zero-length special token
    or a byte token in the middle of a character shares its end with the token after it, and only
    the last one's next token starts where the remaining text starts. One-to-one both ways by
    construction; no dynamic programming. Ends come from :func:`end_offsets`.
    """
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    receiver_ends = np.asarray(receiver_ends, dtype=np.int64)
    out = np.full(len(receiver_ends), -1, dtype=np.int64)
    t_pos = np.flatnonzero(_last_at_end(teacher_ends))
    r_pos = np.flatnonzero(_last_at_end(receiver_ends))
    if len(t_pos) == 0 or len(r_pos) == 0:
        return out
    t_keys = teacher_ends[t_pos]
    order = np.argsort(t_keys, kind="stable")
    t_keys, t_pos = t_keys[order], t_pos[order]
    wanted = receiver_ends[r_pos]
    at = np.minimum(np.searchsorted(t_keys, wanted), len(t_keys) - 1)
    hit = t_keys[at] == wanted
    out[r_pos[hit]] = t_pos[at[hit]]
    return out


def _string_ends(tokens: Sequence[str]) -> np.ndarray:
    return np.cumsum(np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)))


def one_to_one_matches(
    teacher: Sequence[str],
    receiver: Sequence[str],
    teacher_ends: np.ndarray | None = None,
    receiver_ends: np.ndarray | None = None,
) -> np.ndarray:
    """For each receiver position, the teacher position it is matched to one-to-one, or -1.

    A pair ``(j, i)`` on the DTW path is one-to-one when receiver position ``i`` pairs with no
    other teacher position, teacher position ``j`` with no other receiver position, *and* both
    tokens end at the same place of the text (:func:`offset_matches` agrees). Without the last
    test DTW pairs teacher ``▁the ▁quick ▁fox`` with receiver ``▁the ▁quic k ▁fox`` as
    ``▁quic <-> ▁quick`` and ``k <-> ▁fox``, each one-to-one on the path, and ``▁quic`` would be
    taught what follows ``▁quick``. ``*_ends`` are the tokens' end offsets (:func:`end_offsets`);
    when omitted they are the cumulative lengths of the token strings, right for normalised
    text tokens but not for special tokens such as ``<bos>``, which take no room in the text.
    """
    out = np.full(len(receiver), -1, dtype=np.int64)
    path = _path_array(teacher, receiver)
    if len(path) == 0:
        return out
    receiver_degree = np.bincount(path[:, 1], minlength=len(receiver))
    teacher_degree = np.bincount(path[:, 0], minlength=len(teacher))
    single = (receiver_degree[path[:, 1]] == 1) & (teacher_degree[path[:, 0]] == 1)
    t_ends = _string_ends(teacher) if teacher_ends is None else teacher_ends
    r_ends = _string_ends(receiver) if receiver_ends is None else receiver_ends
    same_end = offset_matches(t_ends, r_ends)
    pairs = path[single]
    keep = same_end[pairs[:, 1]] == pairs[:, 0]
    out[pairs[keep, 1]] = pairs[keep, 0]
    return out
