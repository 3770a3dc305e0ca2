"""Small, obviously-correct pure-Python references for the token-alignment package.

They follow the specification line by line (no pruning, no vectorisation) so the fast versions in
``fedmkt.alignment`` can be checked against them by property-based tests and by the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Distance = Callable[[str, str], int]


def levenshtein(a: str, b: str) -> int:
    """Unit-cost insert/delete/substitute edit distance, one DP row at a time."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def common_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


def vocab_map(src: Sequence[str], dst: Sequence[str], distance: Distance = levenshtein) -> list[int]:
    """Brute force MinED: every destination compared; ties -> longest common prefix, smallest id."""
    out = []
    for s in src:
        if not s:
            out.append(-1)
            continue
        best_key, best_id = None, -1
        for j, d in enumerate(dst):
            if not d:
                continue
            key = (distance(s, d), -common_prefix(s, d), j)
            if best_key is None or key < best_key:
                best_key, best_id = key, j
        out.append(best_id)
    return out


def nearest_first_min(src: str, dst: Sequence[str], distance: Distance = levenshtein) -> tuple[int, int]:
    """The reference implementation's loop: every destination, keep the first minimum (id, distance)."""
    best_id, best = -1, None
    for j, d in enumerate(dst):
        if d:
            value = distance(src, d)
            if best is None or value < best:
                best_id, best = j, value
    return best_id, -1 if best is None else best


def min_distances(src: Sequence[str], dst: Sequence[str], distance: Distance = levenshtein) -> list[int]:
    """For each non-empty source string, the minimum distance to any non-empty destination."""
    candidates = [d for d in dst if d]
    return [min(distance(s, d) for d in candidates) if s else -1 for s in src]


def dtw_path(a: Sequence[str], b: Sequence[str], distance: Distance = levenshtein) -> list[tuple[int, int]]:
    """O(n*m) DTW with ties broken diagonal, then up (i-1), then left (j-1) in the backtrace."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    acc = [[0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            cost = distance(a[i], b[j])
            if i == 0 and j == 0:
                acc[i][j] = cost
            elif i == 0:
                acc[i][j] = cost + acc[i][j - 1]
            elif j == 0:
                acc[i][j] = cost + acc[i - 1][j]
            else:
                acc[i][j] = cost + min(acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while (i, j) != (0, 0):
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            options = [(acc[i - 1][j - 1], 0), (acc[i - 1][j], 1), (acc[i][j - 1], 2)]
            move = min(options)[1]
            if move == 0:
                i, j = i - 1, j - 1
            elif move == 1:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    return path[::-1]


def ends_by_length(tokens: Sequence[str]) -> list[int]:
    """Where each token ends in the concatenated text: the running sum of token lengths."""
    ends, total = [], 0
    for tok in tokens:
        total += len(tok)
        ends.append(total)
    return ends


def offset_oracle(teacher_ends: Sequence[int], receiver_ends: Sequence[int]) -> list[int]:
    """Receiver position -> the teacher position ending at the same offset, each the last to end there.

    A token followed by another that ends at the same offset (a zero-length special token, a byte
    token in the middle of a character) is not the one whose next token starts the remaining text.
    Written as plain loops over offsets, independently of ``fedmkt.alignment.sequence``.
    """

    def last_at(ends: Sequence[int]) -> dict[int, int]:
        table: dict[int, int] = {}
        for pos, end in enumerate(ends):
            table[end] = pos  # later positions overwrite earlier ones with the same end
        return table

    teacher_last = last_at(teacher_ends)
    receiver_last = last_at(receiver_ends)
    out = []
    for pos, end in enumerate(receiver_ends):
        out.append(teacher_last.get(end, -1) if receiver_last[end] == pos else -1)
    return out


def one_to_one_matches(
    teacher: Sequence[str],
    receiver: Sequence[str],
    distance: Distance = levenshtein,
    teacher_ends: Sequence[int] | None = None,
    receiver_ends: Sequence[int] | None = None,
) -> list[int]:
    """Receiver position -> its teacher position where each is the other's only partner on the DTW
    path and both tokens end at the same offset (ends default to cumulative lengths), else -1."""
    partners: list[list[int]] = [[] for _ in receiver]
    teacher_partners: list[list[int]] = [[] for _ in teacher]
    for i, j in dtw_path(teacher, receiver, distance):
        partners[j].append(i)
        teacher_partners[i].append(j)
    same_end = offset_oracle(
        ends_by_length(teacher) if teacher_ends is None else teacher_ends,
        ends_by_length(receiver) if receiver_ends is None else receiver_ends,
    )
    return [
        p[0] if len(p) == 1 and len(teacher_partners[p[0]]) == 1 and same_end[r] == p[0] else -1
        for r, p in enumerate(partners)
    ]


def align_topk(topk_ids, topk_logits, matched, vocab_map, fallback, temperature=1.0, k=None, logsumexp=None):
    """Loop version of ``fedmkt.alignment.align_topk`` on nested lists; returns (ids, probs) lists.

    With `logsumexp` (one per teacher position): each slot's true probability, the mass of the
    slots that map to one receiver id added up in its first slot.
    """
    import math

    if logsumexp is not None:
        return _align_topk_true_probs(topk_ids, topk_logits, matched, vocab_map, fallback, temperature, k, logsumexp)

    if k is None:
        k = len(topk_ids[0]) if len(topk_ids) else 0
    out_ids, out_probs = [], []
    for pos, j in enumerate(matched):
        ids, probs = [-1] * k, [0.0] * k
        if j >= 0:
            seen, kept = set(), []
            for slot in range(k):
                t = topk_ids[j][slot]
                r = vocab_map[t] if 0 <= t < len(vocab_map) else -1
                if r >= 0 and r not in seen:
                    seen.add(r)
                    kept.append(slot)
                    ids[slot] = r
            if kept:
                top = max(topk_logits[j][s] / temperature for s in kept)
                weights = {s: math.exp(topk_logits[j][s] / temperature - top) for s in kept}
                total = sum(weights.values())
                for s in kept:
                    probs[s] = weights[s] / total
        elif fallback[pos] >= 0:
            ids[0], probs[0] = fallback[pos], 1.0
        out_ids.append(ids)
        out_probs.append(probs)
    return out_ids, out_probs


def _align_topk_true_probs(topk_ids, topk_logits, matched, vocab_map, fallback, temperature, k, logsumexp):
    import math

    if k is None:
        k = len(topk_ids[0]) if len(topk_ids) else 0
    out_ids, out_probs = [], []
    for pos, j in enumerate(matched):
        ids, probs = [-1] * k, [0.0] * k
        if j >= 0:
            true = [math.exp(topk_logits[j][s] / temperature - logsumexp[j]) for s in range(k)]
            total = sum(true)
            if total > 1:  # rounding between the sent values and their log-sum-exp
                true = [p / total for p in true]
            first_slot_of = {}
            for slot in range(k):
                t = topk_ids[j][slot]
                r = vocab_map[t] if 0 <= t < len(vocab_map) else -1
                if r < 0:
                    continue
                if r not in first_slot_of:
                    first_slot_of[r] = slot
                    ids[slot] = r
                probs[first_slot_of[r]] += true[slot]
        elif fallback[pos] >= 0:
            ids[0], probs[0] = fallback[pos], 1.0
        out_ids.append(ids)
        out_probs.append(probs)
    return out_ids, out_probs


class ListTokenizer:
    """The slice of a Hugging Face tokenizer the alignment code reads, over a fixed token list."""

    def __init__(self, tokens: Sequence[str | None], byte_level: bool = False) -> None:
        self.tokens = list(tokens)
        self.byte_level = byte_level

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            if tok is not None:
                vocab.setdefault(tok, i)
        return vocab
