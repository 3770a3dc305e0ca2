"""Minimum-edit-distance (MinED) nearest-token search between two vocabularies.

For every source string, find the destination index with the smallest Levenshtein distance.
Ties are broken by the longest common prefix with the source (the candidate that starts like the
source token is the better substitute), then by the smallest destination index, so the result is
deterministic. Empty destination strings are never candidates; an empty source maps to -1.

Brute force compares every pair (about 1.3e10 pairs for Gemma-3 x SmolLM2, ~100 core-minutes per
direction in the reference implementation). The search here returns exactly the same answer but
scores only a tiny fraction of the pairs:

1. exact matches come from a dict;
2. destinations are bucketed by length and visited outwards from the source's length, stopping
   once the length difference (a lower bound on the distance) exceeds the best distance;
3. every destination carries a 128-bit multiset signature: one bit per (character, occurrence
   number), dedicated bits for the pairs frequent in the destination vocabulary. An occurrence
   one string has and the other lacks costs at least one edit, so
   ``d >= max(la, lb) - la + popcount(sig_a & ~sig_b)`` (and symmetrically): an O(1) bound;
4. a candidate within distance ``t`` can miss at most ``t - (lb - la)+`` of the source's signature
   bits, so it appears in the posting list of at least one of any that-many-plus-one source
   bits; per length bucket only the shortest such lists are read (or the whole bucket through a
   vectorised bound loop when that is cheaper);
5. the strings sorting next to the source (longest common prefixes) are scored first as seeds,
   and a few passes of iterative deepening on the distance keep the pruning threshold tight;
6. survivors of the bound, of a check of the first two characters against the tie-break and of
   an exact character-multiset bound get the distance from Myers' bit-parallel algorithm (one
   machine word for sources up to 64 characters, a DP row beyond), abandoned early.

The search is compiled by Numba (cached on disk after the first call) and runs on a thread pool
over chunks of source strings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["nearest_tokens", "encode_strings"]

_INF = np.int64(1 << 40)
_NO_ID = np.int64(1 << 62)
# Neighbours on each side of the query in sorted order that are scored before the scan.
_SEEDS = 4


def encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code points of all strings concatenated (int32) and their offsets (int64, ``len + 1``)."""
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    joined = "".join(strings)
    chars = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int32)
    return chars, offsets


@intrinsic
def _popcount(typingctx, x):  # pragma: no cover - compiled
    """Hardware population count of a uint64 (LLVM ctpop)."""
    signature = types.int64(types.uint64)

    def codegen(context, builder, sig, args):
        return builder.zext(builder.ctpop(args[0]), context.get_value_type(types.int64))

    return signature, codegen


# Signature layout: 96 bits are given to the (character, occurrence) pairs most common in the
# destination vocabulary, so frequent characters never collide; every other pair hashes into the
# remaining 32 bits. Pairs eligible for a dedicated bit: characters below _DEDICATED_CHARS and the
# first _DEDICATED_OCCURRENCES occurrences.
_DEDICATED_BITS = 96
_DEDICATED_CHARS = 0x3000
_DEDICATED_OCCURRENCES = 4


@numba.njit(cache=True, inline="always")
def _occurrence(chars, start, p):  # pragma: no cover - compiled
    """How many times ``chars[p]`` already occurred in ``chars[start:p]``."""
    c = chars[p]
    n = 0
    for r in range(start, p):
        if chars[r] == c:
            n += 1
    return n


@numba.njit(cache=True)
def _pair_counts(chars, offsets):  # pragma: no cover - compiled
    counts = np.zeros(_DEDICATED_CHARS * _DEDICATED_OCCURRENCES, dtype=np.int64)
    for i in range(offsets.shape[0] - 1):
        for p in range(offsets[i], offsets[i + 1]):
            c = chars[p]
            if c < _DEDICATED_CHARS:
                k = _occurrence(chars, offsets[i], p)
                if k < _DEDICATED_OCCURRENCES:
                    counts[c * _DEDICATED_OCCURRENCES + k] += 1
    return counts


def signature_layout(chars: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bit table for :func:`_signature`: dedicated bits for the most frequent pairs, -1 elsewhere."""
    counts = _pair_counts(chars, offsets)
    top = np.argsort(-counts, kind="stable")[:_DEDICATED_BITS]
    top = top[counts[top] > 0]
    layout = np.full(counts.shape[0], -1, dtype=np.int64)
    layout[top] = np.arange(len(top))
    return layout


@numba.njit(cache=True)
def _signature(chars, start, length, layout):  # pragma: no cover - compiled
    """128-bit multiset signature (two words): one bit per (character, occurrence number).

    The k-th occurrence of a character sets one bit (its dedicated bit, else a hashed one). A bit
    set for one string and not the other comes from an occurrence the other string lacks, so
    ``popcount(sa & ~sb)`` never exceeds the number of characters of ``a`` that no alignment
    can match in ``b``: a lower bound on the edit distance, whatever the collisions.
    """
    lo = np.uint64(0)
    hi = np.uint64(0)
    for p in range(start, start + length):
        c = chars[p]
        k = _occurrence(chars, start, p)
        index = np.int64(-1)
        if c < _DEDICATED_CHARS and k < _DEDICATED_OCCURRENCES:
            index = layout[c * _DEDICATED_OCCURRENCES + k]
        if index < 0:
            x = np.uint64(c) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(k) * np.uint64(0xC2B2AE3D27D4EB4F)
            x ^= x >> np.uint64(31)
            x *= np.uint64(0x94D049BB133111EB)
            index = _DEDICATED_BITS + np.int64(x >> np.uint64(59))
        if index < 64:
            lo |= np.uint64(1) << np.uint64(index)
        else:
            hi |= np.uint64(1) << np.uint64(index - 64)
    return lo, hi


@numba.njit(cache=True)
def _signatures(chars, offsets, layout):  # pragma: no cover - compiled
    n = offsets.shape[0] - 1
    lo = np.zeros(n, dtype=np.uint64)
    hi = np.zeros(n, dtype=np.uint64)
    for i in range(n):
        lo[i], hi[i] = _signature(chars, offsets[i], offsets[i + 1] - offsets[i], layout)
    return lo, hi


@numba.njit(cache=True)
def _dp_distance(a, a_start, a_len, b, b_start, b_len, row):  # pragma: no cover - compiled
    """Plain O(la*lb) Levenshtein, used only for sources longer than 64 characters."""
    for j in range(b_len + 1):
        row[j] = j
    for i in range(1, a_len + 1):
        diag = row[0]
        row[0] = i
        ca = a[a_start + i - 1]
        for j in range(1, b_len + 1):
            up = row[j]
            best = diag + (0 if ca == b[b_start + j - 1] else 1)
            if up + 1 < best:
                best = up + 1
            if row[j - 1] + 1 < best:
                best = row[j - 1] + 1
            row[j] = best
            diag = up
    return row[b_len]


@numba.njit(cache=True, inline="always")
def _slot(c, high_chars, n_high):  # pragma: no cover - compiled
    """Index of character ``c`` in the query's count table (-1: not in the query)."""
    if c < 256:
        return c
    for h in range(n_high):
        if high_chars[h] == c:
            return 256 + h
    return -1


@numba.njit(cache=True)
def _compare(q_chars, a_start, la, d_chars, b_start, lb):  # pragma: no cover - compiled
    """-1, 0, 1 as the query string sorts before, equal to, after the candidate (code points)."""
    n = la if la < lb else lb
    for i in range(n):
        x = q_chars[a_start + i]
        y = d_chars[b_start + i]
        if x != y:
            return -1 if x < y else 1
    if la == lb:
        return 0
    return -1 if la < lb else 1


@numba.njit(cache=True)
def _process(
    buf_k,
    buf_bound,
    n,
    best,
    a_head0,
    a_head1,
    d_head,
    q_chars,
    a_start,
    la,
    d_chars,
    d_off,
    d_id,
    low_peq,
    high_chars,
    high_masks,
    n_high,
    counts,
    left,
    row,
):  # pragma: no cover - compiled
    """Score the ``n`` buffered candidates (index, lower bound); return the updated best.

    ``best`` is ``(distance, common prefix, id)``; a candidate replaces it if it is nearer, or as
    near with a longer common prefix, or as near with the same prefix and a smaller id. The
    steps, cheapest first: the bound, the first two characters, the exact common prefix, the
    exact multiset bound, and only then the distance itself. Written as one flat function (no
    nested inlining), which keeps Numba's compile time down.
    """
    best_d, best_lcp, best_id = best
    one = np.uint64(1)
    for t in range(n):
        k = buf_k[t]
        bound = buf_bound[t]
        if bound > best_d:
            continue
        # At equal bound only a better tie-break can win; the common prefix capped at 2 comes
        # from the packed heads array without touching the candidate's string.
        if bound == best_d:
            short_lcp = 0 if d_head[k, 0] != a_head0 else (1 if d_head[k, 1] != a_head1 else 2)
            if short_lcp < 2 and (short_lcp < best_lcp or (short_lcp == best_lcp and d_id[k] > best_id)):
                continue
        b_start = d_off[k]
        lb = d_off[k + 1] - b_start
        lcp = 0
        shortest = la if la < lb else lb
        while lcp < shortest and q_chars[a_start + lcp] == d_chars[b_start + lcp]:
            lcp += 1
        cid = d_id[k]
        better_key = lcp > best_lcp or (lcp == best_lcp and cid < best_id)
        # A candidate that loses the tie-break must be strictly nearer to win.
        limit = best_d if better_key else best_d - 1
        if bound > limit:
            continue
        longer = la if la > lb else lb

        # Exact multiset bound: d >= longer - |common characters|; `left` is scratch space.
        need = longer - limit
        if limit < _INF and need > 0:
            common = 0
            for j in range(lb):
                slot = _slot(d_chars[b_start + j], high_chars, n_high)
                if slot >= 0 and left[slot] > 0:
                    left[slot] -= 1
                    common += 1
                    if common >= need:
                        break
                elif common + (lb - 1 - j) < need:
                    break
            for j in range(lb):
                slot = _slot(d_chars[b_start + j], high_chars, n_high)
                if slot >= 0:
                    left[slot] = counts[slot]
            if common < need:
                continue

        if la <= 64:
            # Myers' bit-parallel Levenshtein (Hyyro's formulation), abandoned as soon as the
            # remaining characters can no longer bring it under `limit`.
            top = one << np.uint64(la - 1)
            vp = ~np.uint64(0)
            vn = np.uint64(0)
            dist = la
            for j in range(lb):
                c = d_chars[b_start + j]
                if c < 256:
                    eq = low_peq[c]
                else:
                    eq = np.uint64(0)
                    for h in range(n_high):
                        if high_chars[h] == c:
                            eq = high_masks[h]
                            break
                xv = eq | vn
                xh = (((eq & vp) + vp) ^ vp) | eq
                ph = vn | ~(xh | vp)
                mh = vp & xh
                if ph & top:
                    dist += 1
                elif mh & top:
                    dist -= 1
                ph = (ph << one) | one
                mh = mh << one
                vp = mh | ~(xv | ph)
                vn = ph & xv
                if dist - (lb - 1 - j) > limit:
                    dist = limit + 1
                    break
        else:
            dist = _dp_distance(q_chars, a_start, la, d_chars, b_start, lb, row)
        if dist < best_d or (dist == best_d and better_key):
            best_d = np.int64(dist)
            best_lcp = np.int64(lcp)
            best_id = np.int64(cid)
    return (best_d, best_lcp, best_id)


@numba.njit(cache=True)
def _postings(sig_lo, sig_hi, bucket):  # pragma: no cover - compiled
    """Per (length, signature bit): the candidates carrying that bit, as CSR (ptr, idx)."""
    n_keys = bucket.shape[0] * 128
    ptr = np.zeros(n_keys + 1, dtype=np.int64)
    for length in range(bucket.shape[0] - 1):
        for k in range(bucket[length], bucket[length + 1]):
            for i in range(128):
                word = sig_lo[k] if i < 64 else sig_hi[k]
                if (word >> np.uint64(i % 64)) & np.uint64(1):
                    ptr[length * 128 + i + 1] += 1
    for key in range(n_keys):
        ptr[key + 1] += ptr[key]
    idx = np.empty(ptr[n_keys], dtype=np.int64)
    fill = ptr[:-1].copy()
    for length in range(bucket.shape[0] - 1):
        for k in range(bucket[length], bucket[length + 1]):
            for i in range(128):
                word = sig_lo[k] if i < 64 else sig_hi[k]
                if (word >> np.uint64(i % 64)) & np.uint64(1):
                    key = length * 128 + i
                    idx[fill[key]] = k
                    fill[key] += 1
    return ptr, idx


@numba.njit(cache=True)
def _nearest_one(
    q_chars,
    a_start,
    la,
    d_chars,
    d_off,
    d_head,
    d_sig_lo,
    d_sig_hi,
    layout,
    post_ptr,
    post_idx,
    d_id,
    bucket,
    by_string,
    n_seeds,
    widest,
):  # pragma: no cover - compiled
    """Nearest candidate ``(distance, common prefix, id)`` for one query string."""
    n_cand = d_id.shape[0]
    max_len = bucket.shape[0] - 2
    # Pattern bitmasks (Myers) and character counts (multiset bound) of the query.
    low_peq = np.zeros(256, dtype=np.uint64)
    high_chars = np.empty(la, dtype=np.int32)
    high_masks = np.zeros(la, dtype=np.uint64)
    counts = np.zeros(256 + la, dtype=np.int32)
    n_high = 0
    for i in range(la):
        c = q_chars[a_start + i]
        bit = np.uint64(1) << np.uint64(i % 64)
        if c < 256:
            low_peq[c] |= bit
            counts[c] += 1
        else:
            slot = _slot(c, high_chars, n_high)
            if slot < 0:
                high_chars[n_high] = c
                high_masks[n_high] = bit
                counts[256 + n_high] = 1
                n_high += 1
            else:
                high_masks[slot - 256] |= bit
                counts[slot] += 1
    left = counts.copy()
    sig_lo, sig_hi = _signature(q_chars, a_start, la, layout)
    bits = np.empty(128, dtype=np.int64)
    bit_len = np.empty(128, dtype=np.int64)
    n_bits = 0
    for i in range(128):
        word = sig_lo if i < 64 else sig_hi
        if (word >> np.uint64(i % 64)) & np.uint64(1):
            bits[n_bits] = i
            n_bits += 1
    a_head0 = q_chars[a_start]
    a_head1 = q_chars[a_start + 1] if la > 1 else -1
    row = np.empty(max_len + 1, dtype=np.int64)
    size = widest if widest > 2 * n_seeds else 2 * n_seeds
    buf_k = np.empty(size, dtype=np.int64)
    buf_bound = np.empty(size, dtype=np.int64)

    # Seeds: the strings sorting next to the query share its longest prefix and are often its
    # nearest tokens; scoring them first gives the scan a finite bound to prune with.
    lo, hi = 0, n_cand
    while lo < hi:
        mid = (lo + hi) // 2
        cm = by_string[mid]
        if _compare(q_chars, a_start, la, d_chars, d_off[cm], d_off[cm + 1] - d_off[cm]) > 0:
            lo = mid + 1
        else:
            hi = mid
    n = 0
    for k in range(max(lo - n_seeds, 0), min(lo + n_seeds, n_cand)):
        buf_k[n] = by_string[k]
        buf_bound[n] = 0
        n += 1
    seeded = _process(
        buf_k,
        buf_bound,
        n,
        (_INF, np.int64(-1), _NO_ID),
        a_head0,
        a_head1,
        d_head,
        q_chars,
        a_start,
        la,
        d_chars,
        d_off,
        d_id,
        low_peq,
        high_chars,
        high_masks,
        n_high,
        counts,
        left,
        row,
    )

    # Iterative deepening on the distance: a pass with threshold t finds the best candidate within
    # distance t, pruning as if the answer were known to be t (tighter than pruning with a loose
    # running best). Passes start two below the seeds' distance and stop at the first threshold
    # with a candidate; the last possible pass keeps the seeds' best.
    threshold = max(np.int64(1), seeded[0] - 2)
    while True:
        best = seeded if threshold >= seeded[0] else (threshold, np.int64(-1), _NO_ID)
        # Length buckets outwards from the query's length, while the length difference (a lower
        # bound on the distance) can still reach the best distance.
        delta = 0
        while delta <= best[0] and (la - delta >= 1 or la + delta <= max_len):
            for side in range(2 if delta > 0 else 1):
                lb = la - delta if side == 0 else la + delta
                if lb < 1 or lb > max_len or delta > best[0]:
                    continue
                start, stop = bucket[lb], bucket[lb + 1]
                longer = la if la > lb else lb
                extra_a = longer - la
                extra_b = longer - lb
                # A candidate within reach misses at most `spare` of the query's signature bits,
                # so it carries at least one of any `spare + 1` of them: the union of the posting
                # lists of the `spare + 1` rarest bits holds every candidate worth scoring.
                spare = best[0] - extra_a
                lists = 0
                if spare + 1 <= n_bits:
                    base = lb * 128
                    for i in range(n_bits):
                        bit_len[i] = post_ptr[base + bits[i] + 1] - post_ptr[base + bits[i]]
                    total = 0
                    for j in range(spare + 1):  # selection of the spare + 1 shortest lists
                        pick = j
                        for i in range(j + 1, n_bits):
                            if bit_len[i] < bit_len[pick]:
                                pick = i
                        bit_len[j], bit_len[pick] = bit_len[pick], bit_len[j]
                        bits[j], bits[pick] = bits[pick], bits[j]
                        total += bit_len[j]
                    if total < stop - start:
                        lists = spare + 1
                if lists > 0:
                    seen_lo = np.uint64(0)
                    seen_hi = np.uint64(0)
                    for j in range(lists):
                        if j > best[0] - extra_a:
                            break  # the best improved: the lists read so far already cover it
                        base = lb * 128 + bits[j]
                        n = 0
                        for t in range(post_ptr[base], post_ptr[base + 1]):
                            k = post_idx[t]
                            lo_b = d_sig_lo[k]
                            hi_b = d_sig_hi[k]
                            if (lo_b & seen_lo) | (hi_b & seen_hi):
                                continue  # already met in an earlier list
                            b1 = extra_a + _popcount(sig_lo & ~lo_b) + _popcount(sig_hi & ~hi_b)
                            b2 = extra_b + _popcount(lo_b & ~sig_lo) + _popcount(hi_b & ~sig_hi)
                            buf_k[n] = k
                            buf_bound[n] = b1 if b1 > b2 else b2
                            n += 1
                        best = _process(
                            buf_k,
                            buf_bound,
                            n,
                            best,
                            a_head0,
                            a_head1,
                            d_head,
                            q_chars,
                            a_start,
                            la,
                            d_chars,
                            d_off,
                            d_id,
                            low_peq,
                            high_chars,
                            high_masks,
                            n_high,
                            counts,
                            left,
                            row,
                        )
                        if bits[j] < 64:
                            seen_lo |= np.uint64(1) << np.uint64(bits[j])
                        else:
                            seen_hi |= np.uint64(1) << np.uint64(bits[j] - 64)
                else:
                    # The signature bound of the whole bucket in one vectorisable loop.
                    for k in range(start, stop):
                        lo_b = d_sig_lo[k]
                        hi_b = d_sig_hi[k]
                        b1 = extra_a + _popcount(sig_lo & ~lo_b) + _popcount(sig_hi & ~hi_b)
                        b2 = extra_b + _popcount(lo_b & ~sig_lo) + _popcount(hi_b & ~sig_hi)
                        buf_k[k - start] = k
                        buf_bound[k - start] = b1 if b1 > b2 else b2
                    best = _process(
                        buf_k,
                        buf_bound,
                        stop - start,
                        best,
                        a_head0,
                        a_head1,
                        d_head,
                        q_chars,
                        a_start,
                        la,
                        d_chars,
                        d_off,
                        d_id,
                        low_peq,
                        high_chars,
                        high_masks,
                        n_high,
                        counts,
                        left,
                        row,
                    )
            delta += 1
        if best[2] != _NO_ID:
            return best
        threshold += 1


@numba.njit(cache=True, nogil=True)
def _nearest_kernel(
    q_chars,
    q_off,
    first,
    last,
    d_chars,
    d_off,
    d_head,
    d_sig_lo,
    d_sig_hi,
    layout,
    post_ptr,
    post_idx,
    d_id,
    bucket,
    by_string,
    n_seeds,
    out_id,
    out_dist,
):  # pragma: no cover - compiled
    """Queries ``first .. last - 1``; releases the GIL so threads can share the work."""
    widest = 0
    for length in range(bucket.shape[0] - 1):
        if bucket[length + 1] - bucket[length] > widest:
            widest = bucket[length + 1] - bucket[length]
    for q in range(first, last):
        best = _nearest_one(
            q_chars,
            q_off[q],
            q_off[q + 1] - q_off[q],
            d_chars,
            d_off,
            d_head,
            d_sig_lo,
            d_sig_hi,
            layout,
            post_ptr,
            post_idx,
            d_id,
            bucket,
            by_string,
            n_seeds,
            widest,
        )
        out_id[q] = best[2]
        out_dist[q] = best[0]


def _workers() -> int:
    """Threads for the search: the CPUs this process may use (``FEDMKT_ALIGN_THREADS`` overrides)."""
    configured = os.environ.get("FEDMKT_ALIGN_THREADS")
    if configured:
        return max(1, int(configured))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _heads(chars: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """First two code points of each string (-1 past its end), as a contiguous [n, 2] array."""
    lengths = np.diff(offsets)
    heads = np.full((len(lengths), 2), -1, dtype=np.int32)
    heads[lengths >= 1, 0] = chars[offsets[:-1][lengths >= 1]]
    heads[lengths >= 2, 1] = chars[offsets[:-1][lengths >= 2] + 1]
    return heads


def nearest_tokens(src: Sequence[str], dst: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, distances)``, both int64 of shape ``[len(src)]`` (-1 where no candidate)."""
    ids = np.full(len(src), -1, dtype=np.int64)
    dists = np.full(len(src), -1, dtype=np.int64)
    cand = [i for i, tok in enumerate(dst) if tok]
    if not cand:
        return ids, dists
    exact: dict[str, int] = {}
    for i in cand:
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
    if not pending:
        return ids, dists

    # Destinations in (length, id) order, with the start of each length's bucket.
    cand_ids = np.asarray(cand, dtype=np.int64)
    cand_len = np.fromiter((len(dst[i]) for i in cand), dtype=np.int64, count=len(cand))
    order = np.lexsort((cand_ids, cand_len))
    d_id = cand_ids[order]
    d_chars, d_off = encode_strings([dst[i] for i in d_id.tolist()])
    max_len = int(cand_len.max())
    bucket = np.searchsorted(cand_len[order], np.arange(max_len + 2), side="left").astype(np.int64)
    layout = signature_layout(d_chars, d_off)
    d_sig_lo, d_sig_hi = _signatures(d_chars, d_off, layout)
    post_ptr, post_idx = _postings(d_sig_lo, d_sig_hi, bucket)
    bucket_strings = [dst[i] for i in d_id.tolist()]
    by_string = np.asarray(sorted(range(len(bucket_strings)), key=bucket_strings.__getitem__), dtype=np.int64)

    queries = list(pending)
    q_chars, q_off = encode_strings(queries)
    out_id = np.empty(len(queries), dtype=np.int64)
    out_dist = np.empty(len(queries), dtype=np.int64)
    heads = _heads(d_chars, d_off)

    def run(first: int, last: int) -> None:
        _nearest_kernel(
            q_chars,
            q_off,
            first,
            last,
            d_chars,
            d_off,
            heads,
            d_sig_lo,
            d_sig_hi,
            layout,
            post_ptr,
            post_idx,
            d_id,
            bucket,
            by_string,
            _SEEDS,
            out_id,
            out_dist,
        )

    # Small chunks handed to a thread pool balance the very uneven per-query cost.
    chunk = max(64, len(queries) // 256)
    spans = [(i, min(i + chunk, len(queries))) for i in range(0, len(queries), chunk)]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(lambda span: run(*span), spans))
    for query, found, dist in zip(queries, out_id.tolist(), out_dist.tolist()):
        for i in pending[query]:
            ids[i], dists[i] = found, dist
    return ids, dists
