"""A readable account of how one teacher's positions land on a receiver's, for one text.

This is what `fedmkt align-text` prints. It runs the same :class:`TokenAligner` (vocabulary map from
the same cache, same sequence alignment) that the rounds use, so a pair of models that distills
badly can be inspected position by position: which receiver positions take a teacher's
distribution, from which teacher token, and what the teacher's token becomes in the receiver's
vocabulary; and which fall back to the one-hot on the receiver's next token.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from fedmkt.alignment.aligner import TokenAligner
from fedmkt.data.tokenize import prompt_token_ids

__all__ = ["alignment_rows", "format_rows", "ROW_KEYS"]

ROW_KEYS = ("dst_index", "dst_token", "dst_span", "src_index", "src_token", "src_span", "target")
"""The keys of every row, in order (the `--json` output's objects have exactly these)."""


def _char_spans(pieces: list[bytes], text: str) -> list[list[int]]:
    """Each token's character span ``[start, end)`` in ``text``, from its bytes.

    A token that covers only part of a character's bytes spans that whole character. A leading
    space the tokenizer added itself (a SentencePiece dummy prefix) is not in ``text`` and is
    discounted; spans are clipped to the text.
    """
    raw = text.encode("utf-8")
    char_bytes = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum([len(ch.encode("utf-8")) for ch in text], out=char_bytes[1:])
    joined = b"".join(pieces)
    shift = len(joined) - len(raw) if len(joined) > len(raw) and joined.endswith(raw) else 0
    ends = np.cumsum([len(p) for p in pieces]) - shift if pieces else np.zeros(0, dtype=np.int64)
    starts = ends - np.array([len(p) for p in pieces], dtype=np.int64)
    starts = np.clip(starts, 0, len(raw))
    ends = np.clip(ends, 0, len(raw))
    first = np.searchsorted(char_bytes, starts, side="right") - 1
    last = np.searchsorted(char_bytes, ends, side="left")
    return [[int(a), int(max(a, b))] for a, b in zip(first.tolist(), last.tolist())]


def _token(tokenizer: Any, index: int) -> Optional[str]:
    return None if index < 0 else tokenizer.convert_ids_to_tokens(int(index))


def alignment_rows(aligner: TokenAligner, text: str) -> list[dict[str, Any]]:
    """One row per receiver position of ``text``, with the keys of :data:`ROW_KEYS`.

    Both tokenizers encode ``text`` as a run's prompt is encoded (leading special tokens such as
    ``<bos>`` included). ``src_index`` is the matched teacher position (None when unmatched, and
    then ``src_token``/``src_span`` are None too); ``target`` is the receiver token the teacher's
    token maps to through the vocabulary map (None when unmapped), or for an unmatched position
    the fallback target, the receiver's next token (None at the last position).
    """
    teacher_ids = torch.tensor(prompt_token_ids(aligner.teacher_tokenizer, text), dtype=torch.long)
    receiver_ids = torch.tensor(prompt_token_ids(aligner.receiver_tokenizer, text), dtype=torch.long)
    matched = aligner.match_positions(teacher_ids, receiver_ids).tolist()
    src_spans = _char_spans(aligner.teacher_pieces(teacher_ids), text)
    dst_spans = _char_spans(aligner.receiver_pieces(receiver_ids), text)
    vocab_map = aligner.vocab_map
    rows = []
    for i, j in enumerate(matched):
        dst_id = int(receiver_ids[i])
        if j >= 0:
            src_id = int(teacher_ids[j])
            mapped = int(vocab_map[src_id]) if 0 <= src_id < len(vocab_map) else -1
            src = {"src_index": j, "src_token": _token(aligner.teacher_tokenizer, src_id), "src_span": src_spans[j]}
            target = _token(aligner.receiver_tokenizer, mapped)
        else:
            src = {"src_index": None, "src_token": None, "src_span": None}
            target = _token(aligner.receiver_tokenizer, int(receiver_ids[i + 1])) if i + 1 < len(receiver_ids) else None
        row = {
            "dst_index": i,
            "dst_token": _token(aligner.receiver_tokenizer, dst_id),
            "dst_span": dst_spans[i],
            **src,
            "target": target,
        }
        rows.append({key: row[key] for key in ROW_KEYS})
    return rows


def format_rows(rows: list[dict[str, Any]], text: str) -> str:
    """The rows as an aligned plain-text table, with the text each span covers."""

    def show(value: Any) -> str:
        return "-" if value is None else repr(value)

    def piece(span: Optional[list[int]]) -> str:
        return "-" if span is None else f"[{span[0]},{span[1]}) {text[span[0] : span[1]]!r}"

    header = ("dst", "dst_token", "dst_span", "src", "src_token", "src_span", "target")
    table = [header]
    for row in rows:
        matched = row["src_index"] is not None
        table.append(
            (
                str(row["dst_index"]),
                show(row["dst_token"]),
                piece(row["dst_span"]),
                str(row["src_index"]) if matched else "-",
                show(row["src_token"]),
                piece(row["src_span"]),
                ("map " if matched else "fallback ") + show(row["target"]),
            )
        )
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]
    matched_count = sum(row["src_index"] is not None for row in rows)
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.append(
        f"{matched_count} of {len(rows)} receiver positions take the teacher's distribution; the rest fall back to the one-hot on their next token."
    )
    return "\n".join(lines)
