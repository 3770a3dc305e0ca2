"""Token-string normalisation, so that two tokenizers' spellings of the same text compare equal.

Tokenizers spell the same text differently: GPT-2-style byte-level BPE writes a space as ``Ġ`` and
a newline as ``Ċ`` (every byte is shown as one printable character), SentencePiece writes a space
as ``▁`` and unknown characters as byte-fallback tokens such as ``<0x0A>``. Edit distances between
raw token strings would mostly measure these spelling conventions, so every token is first brought
to one common spelling:

* text is real Unicode text (byte-level BPE is decoded back to UTF-8 where the bytes form valid
  UTF-8; ``Ã¯`` becomes ``ï``, ``Ċ`` becomes ``\\n``);
* every space is written as :data:`WORD_MARKER` (``▁``), whether it was ``Ġ``, ``▁`` or ``' '``;
* a byte that is not valid UTF-8 on its own (part of a multi-byte character split over several
  tokens) is written as the GPT-2 byte-level character for that byte, in both conventions, so that
  ``<0xE6>`` (SentencePiece byte fallback) and ``æ`` (byte-level BPE) normalise to the same string.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "WORD_MARKER",
    "normalize_token",
    "is_byte_fallback",
    "is_byte_level",
    "special_token_ids",
    "token_bytes",
    "vocab_strings",
]

#: The common word-boundary marker every space is normalised to.
WORD_MARKER = "\u2581"


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the 68 others (control characters, space,
    DEL, NBSP, soft hyphen) are shifted to U+0100 onwards in byte order, which is why a space
    is ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A).
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {char: byte for byte, char in _BYTE_TO_CHAR.items()}
# Characters that only byte-level BPE uses (the shifted ones); their presence marks a token as
# byte-level when the caller does not say which convention the token uses.
_SHIFTED_CHARS = frozenset(char for char in _CHAR_TO_BYTE if ord(char) >= 0x100)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_text(raw: bytes) -> str:
    """Decode UTF-8, writing each undecodable byte as its byte-level character."""
    text = raw.decode("utf-8", errors="surrogateescape")
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = "".join(_BYTE_TO_CHAR[ord(ch) - 0xDC00] if "\udc80" <= ch <= "\udcff" else ch for ch in text)
    return text.replace(" ", WORD_MARKER)


def _looks_byte_level(token: str) -> bool:
    """Guess whether a lone token is byte-level BPE (used only when the caller cannot say)."""
    if not all(ch in _CHAR_TO_BYTE for ch in token):
        return False
    if any(ch in _SHIFTED_CHARS for ch in token):
        return True
    # Only printable Latin-1: byte-level iff it decodes to UTF-8 that differs from the input
    # (``Ã©`` -> ``é``); plain ASCII is the same either way.
    raw = bytes(_CHAR_TO_BYTE[ch] for ch in token)
    try:
        return raw.decode("utf-8") != token
    except UnicodeDecodeError:
        return False


def is_byte_fallback(token: str | None) -> bool:
    """Whether ``token`` is a SentencePiece byte-fallback token such as ``<0x2C>``."""
    return token is not None and _BYTE_FALLBACK.fullmatch(token) is not None


def normalize_token(token: str, byte_level: bool | None = None) -> str:
    """Return ``token`` in the common spelling described in the module docstring.

    Exactly:

    1. A whole-token byte-fallback ``<0xHH>`` becomes byte ``HH`` (a space becomes ``▁``, a valid
       single-byte character becomes itself, any byte >= 0x80 becomes its byte-level character).
    2. A byte-level token (``byte_level=True``, or guessed when ``None``: it uses only the 256
       byte-level characters and either contains one of the shifted characters such as ``Ġ``/``Ċ``
       or decodes to different valid UTF-8) is mapped back to its bytes and decoded as UTF-8;
       bytes that do not decode are kept as their byte-level characters. A token containing a
       character outside the byte-level alphabet (an added special token with a space, say) is
       not decoded.
    3. Every space (``' '``, and ``Ġ`` from step 2) becomes ``▁``. Everything else is unchanged;
       special tokens such as ``<eos>`` keep their spelling.

    ``byte_level=False`` (SentencePiece, WordPiece, ...) skips step 2. Pass the tokenizer's
    convention when you know it (:func:`vocab_strings` does): the guess cannot tell a Maltese
    ``Ġ`` in a SentencePiece vocabulary from a byte-level space.
    """
    fallback = _BYTE_FALLBACK.fullmatch(token)
    if fallback is not None:
        return _bytes_to_text(bytes([int(fallback.group(1), 16)]))
    if byte_level is None:
        byte_level = _looks_byte_level(token)
    if byte_level and all(ch in _CHAR_TO_BYTE for ch in token):
        return _bytes_to_text(bytes(_CHAR_TO_BYTE[ch] for ch in token))
    return token.replace(" ", WORD_MARKER)


def is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` spells tokens in GPT-2 byte-level form.

    Reads the fast tokenizer's decoder/pre-tokenizer when there is one; otherwise counts which
    word-boundary marker starts more vocabulary entries (``Ġ`` vs ``▁``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = f"{backend.decoder!r} {backend.pre_tokenizer!r}"
        if "ByteLevel" in described:
            return True
        if "Metaspace" in described or WORD_MARKER in described or "ByteFallback" in described:
            return False
    vocab = tokenizer.get_vocab()
    g_count = sum(1 for tok in vocab if tok.startswith("\u0120"))
    s_count = sum(1 for tok in vocab if tok.startswith(WORD_MARKER))
    return g_count > s_count


def vocab_strings(tokenizer: Any) -> list[str]:
    """Normalised token string for every id ``0 .. len(tokenizer) - 1``.

    Ids the tokenizer cannot spell (``None``) become ``""``; the vocabulary map never maps to
    an empty string and maps an empty source string to -1, so such ids never match anything.
    """
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = is_byte_level(tokenizer)
    return ["" if tok is None else normalize_token(tok, byte_level=byte_level) for tok in raw]


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special (control) tokens: ``<bos>``, ``<|im_end|>``, ``<unused0>``...

    These name roles, not text, so their spelling says nothing about what they mean to another
    tokenizer (``<|im_end|>`` is nearest in edit distance to Gemma's ``<unused0>``, a token
    Gemma never predicts). Read from the added tokens flagged special plus ``all_special_ids``.
    """
    ids = {
        int(i)
        for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(added, "special", False)
    }
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return frozenset(ids)


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The UTF-8 bytes each id ``0 .. len(tokenizer) - 1`` stands for in the text (``b""``: none).

    Offset alignment adds these lengths up to find where each token ends, so they must be the
    text's own bytes: byte-level BPE tokens are mapped back through GPT-2's byte table, a
    SentencePiece ``▁`` is a space and ``<0xHH>`` is byte ``HH``. Special tokens (``<bos>``,
    ``<|im_end|>``) and ids the tokenizer cannot spell take no room in the text.
    """
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = is_byte_level(tokenizer)
    special = special_token_ids(tokenizer)
    out: list[bytes] = []
    for i, tok in enumerate(raw):
        if tok is None or i in special:
            out.append(b"")
            continue
        fallback = _BYTE_FALLBACK.fullmatch(tok)
        if fallback is not None:
            out.append(bytes([int(fallback.group(1), 16)]))
        elif byte_level and all(ch in _CHAR_TO_BYTE for ch in tok):
            out.append(bytes(_CHAR_TO_BYTE[ch] for ch in tok))
        else:
            out.append(tok.replace(WORD_MARKER, " ").encode("utf-8", "surrogatepass"))
    return out
