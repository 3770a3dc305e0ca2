"""Vocabulary mapping between two tokenizers by minimum edit distance (MinED), cached on disk.

The map sends every source token id to the destination id whose normalised string (see
:mod:`fedmkt.alignment.tokens`) is nearest in Levenshtein distance: exact matches first, then ties
broken by the longest common prefix with the source, then by the smallest destination id. A
destination byte-fallback token (``<0x2C>``) is never a candidate when an ordinary token spells the
same text (``,``): SentencePiece only emits byte fallbacks for text it has no token for, so the
receiver's model gives them almost no probability and a KD target there cannot be learnt. For
the same reason special tokens (``<|im_end|>``, ``<unused0>``) map only to an identically spelled
special token of the other side, never by edit distance. It
depends only on the two vocabularies, so it is built once per ordered tokenizer pair and cached
under a key made of both vocabularies' content hashes (a renamed copy of a tokenizer hits the
cache; a changed vocabulary misses it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmkt.alignment.mined import nearest_tokens
from fedmkt.alignment.tokens import is_byte_fallback, is_byte_level, normalize_token, special_token_ids, vocab_strings
from fedmkt.files import atomic_write, atomic_write_text

__all__ = [
    "build_vocab_map",
    "load_or_build_vocab_map",
    "load_or_build_vocab_map_hit",
    "mapping_candidates",
    "normalize_token",
    "tokenizer_fingerprint",
    "vocab_strings",
    "write_vocab_map_json",
]

# Bump when normalisation, tie-break or the file layout changes: old cache files then miss.
_CACHE_VERSION = 2  # 2: byte-fallback twins and special tokens are no longer matched by distance


def build_vocab_map(
    src_tokens: Sequence[str],
    dst_tokens: Sequence[str],
    dst_raw_tokens: Sequence[str | None] | None = None,
    *,
    src_special: Collection[int] = frozenset(),
    dst_special: Collection[int] = frozenset(),
) -> np.ndarray:
    """MinED map from normalised source strings to destination ids (int64 ``[len(src_tokens)]``).

    Each entry is the destination index with the minimum Levenshtein distance to the source
    string; ties go to the longest common prefix, then to the smallest index. Empty destination
    strings are never chosen; an empty source string (an id the tokenizer cannot spell) maps to -1.
    With ``dst_raw_tokens`` (the destination's raw spellings), a byte-fallback destination whose
    normalised string equals an ordinary destination token's is left out of the candidates.
    Special tokens (``src_special``/``dst_special`` ids) only ever map to each other, and only
    on an exact string match (``<eos>`` to ``<eos>``); any other special source token maps to -1.
    """
    candidates = list(dst_tokens) if dst_raw_tokens is None else mapping_candidates(dst_tokens, dst_raw_tokens)
    special_dst: dict[str, int] = {}
    for i in sorted(dst_special):
        if 0 <= i < len(candidates) and candidates[i]:
            special_dst.setdefault(candidates[i], i)
            candidates[i] = ""
    sources = (
        ["" if i in src_special else text for i, text in enumerate(src_tokens)] if src_special else list(src_tokens)
    )
    ids, _ = nearest_tokens(sources, candidates)
    for i in src_special:
        if 0 <= i < len(ids):
            ids[i] = special_dst.get(src_tokens[i], -1)
    return ids


def mapping_candidates(strings: Sequence[str], raw: Sequence[str | None]) -> list[str]:
    """Normalised destination ``strings`` with every byte-fallback entry blanked whose text an ordinary token also spells."""
    if len(raw) != len(strings):
        raise ValueError(f"got {len(raw)} raw tokens for {len(strings)} normalised ones")
    ordinary = {text for text, token in zip(strings, raw) if text and not is_byte_fallback(token)}
    return ["" if is_byte_fallback(token) and text in ordinary else text for text, token in zip(strings, raw)]


def _build_for(src_tokenizer: Any, dst_tokenizer: Any, src: Sequence[str], dst: Sequence[str]) -> np.ndarray:
    return build_vocab_map(
        src,
        dst,
        _raw_tokens(dst_tokenizer),
        src_special=special_token_ids(src_tokenizer),
        dst_special=special_token_ids(dst_tokenizer),
    )


def _raw_tokens(tokenizer: Any) -> list[str | None]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) of the vocabulary content: every id's raw token string, in id order."""
    digest = hashlib.sha256()
    for index, token in enumerate(_raw_tokens(tokenizer)):
        spelled = "\x00none" if token is None else token
        digest.update(f"{index}\x1f{len(spelled)}\x1f{spelled}\x1e".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _cache_path(src_tokenizer: Any, dst_tokenizer: Any, cache_dir: str | Path) -> Path:
    src_fp = tokenizer_fingerprint(src_tokenizer)
    dst_fp = tokenizer_fingerprint(dst_tokenizer)
    conventions = f"{int(is_byte_level(src_tokenizer))}{int(is_byte_level(dst_tokenizer))}"
    name = f"vocabmap-v{_CACHE_VERSION}-{conventions}-{src_fp[:32]}-{dst_fp[:32]}.npy"
    return Path(cache_dir) / name


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a bare path
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, save)


def _load_cached(path: Path, length: int) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.dtype != np.int64 or array.shape != (length,):
        return None
    return array


def load_or_build_vocab_map(
    src_tokenizer: Any,
    dst_tokenizer: Any,
    cache_dir: str | Path,
    *,
    src_strings: Sequence[str] | None = None,
    dst_strings: Sequence[str] | None = None,
) -> torch.Tensor:
    """The MinED map ``src id -> dst id`` as a LongTensor ``[len(src_tokenizer)]``, cached on disk.

    The cache file (``.npy``, never pickle) is named by both tokenizers' fingerprints and written
    to a temporary file first, then moved into place with ``os.replace``, so concurrent builders
    and crashed runs never leave a half-written map. ``src_strings``/``dst_strings`` let a caller
    that already holds :func:`vocab_strings` skip recomputing them.
    """
    return load_or_build_vocab_map_hit(
        src_tokenizer, dst_tokenizer, cache_dir, src_strings=src_strings, dst_strings=dst_strings
    )[0]


def load_or_build_vocab_map_hit(
    src_tokenizer: Any,
    dst_tokenizer: Any,
    cache_dir: str | Path,
    *,
    src_strings: Sequence[str] | None = None,
    dst_strings: Sequence[str] | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`load_or_build_vocab_map`, and whether the map came from the cache (False: built and written now).

    A build of two real vocabularies takes seconds to minutes, so callers report which it was.
    """
    path = _cache_path(src_tokenizer, dst_tokenizer, cache_dir)
    cached = _load_cached(path, len(src_tokenizer)) if path.exists() else None
    hit = cached is not None
    if cached is None:
        src = vocab_strings(src_tokenizer) if src_strings is None else src_strings
        dst = vocab_strings(dst_tokenizer) if dst_strings is None else dst_strings
        cached = _build_for(src_tokenizer, dst_tokenizer, src, dst)
        _atomic_save_npy(path, cached)
    return torch.from_numpy(cached).long(), hit


def write_vocab_map_json(
    src_tokenizer: Any,
    dst_tokenizer: Any,
    out: str | Path,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write ``{source token: destination token}`` (raw spellings) for every source id as JSON.

    Used by ``fedmkt map-vocab``. With ``cache_dir`` the map comes from (and lands in) the same
    cache as training runs use. Source ids the tokenizer cannot spell are skipped; a source token
    with no candidate (or a special token with no identically spelled twin) maps to ``null``; if a
    raw spelling occurs twice, the smallest id wins.
    """
    if cache_dir is None:
        mapping = _build_for(src_tokenizer, dst_tokenizer, vocab_strings(src_tokenizer), vocab_strings(dst_tokenizer))
    else:
        mapping = load_or_build_vocab_map(src_tokenizer, dst_tokenizer, cache_dir).numpy()
    src_raw = _raw_tokens(src_tokenizer)
    dst_raw = _raw_tokens(dst_tokenizer)
    table: dict[str, str | None] = {}
    for token, target in zip(src_raw, mapping.tolist()):
        if token is None or token in table:
            continue
        table[token] = dst_raw[target] if target >= 0 else None
    out = Path(out)
    atomic_write_text(out, json.dumps(table, ensure_ascii=False, indent=0))
    return out
