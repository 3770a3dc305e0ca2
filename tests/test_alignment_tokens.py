"""Normalisation of token spellings (Ġ / ▁ / byte-level / byte fallback)."""

import pytest

from fedmkt.alignment import normalize_token, vocab_strings
from fedmkt.alignment.tokens import WORD_MARKER, is_byte_level

try:
    from reference_alignment import ListTokenizer
except ImportError:  # tests/ imported as a package
    from tests.reference_alignment import ListTokenizer


@pytest.mark.parametrize(
    ("token", "byte_level", "expected"),
    [
        ("Ġthe", True, "▁the"),
        ("▁the", False, "▁the"),
        ("ĠĠ", True, "▁▁"),
        ("Ċ", True, "\n"),
        ("ĊĠ", True, "\n▁"),
        ("ĉ", True, "\t"),
        ("Ã¯ve", True, "ïve"),
        ("æľ¬", True, "本"),
        ("ĠðŁ", True, "▁ðŁ"),  # an incomplete emoji keeps its undecodable bytes as byte characters
        ("<0x0A>", False, "\n"),
        ("<0x20>", False, WORD_MARKER),
        ("<0x41>", False, "A"),
        ("<0xF0>", False, "ð"),  # same spelling as the byte-level BPE token for byte 0xF0
        ("▁naïve", False, "▁naïve"),
        ("é", False, "é"),
        ("<eos>", False, "<eos>"),
        ("<|im_start|>", True, "<|im_start|>"),
        ("a b", False, "a▁b"),
    ],
)
def test_normalize_token(token, byte_level, expected):
    assert normalize_token(token, byte_level=byte_level) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("Ġthe", "▁the"),
        ("Ċ", "\n"),
        ("Ã¯ve", "ïve"),
        ("é", "é"),
        ("▁the", "▁the"),
        ("hello", "hello"),
        ("<0x0A>", "\n"),
    ],
)
def test_normalize_token_guesses_convention(token, expected):
    assert normalize_token(token) == expected


def test_sentencepiece_byte_fallback_meets_byte_level_bytes():
    # A multi-byte character split into bytes must spell the same in both conventions.
    for byte in range(0x80, 0x100):
        sentencepiece = normalize_token(f"<0x{byte:02X}>", byte_level=False)
        byte_level_char = normalize_token(bytes([byte]).decode("latin-1"), byte_level=True) if 0xA1 <= byte else None
        if byte_level_char is not None and byte != 0xAD:
            assert sentencepiece == byte_level_char


def test_vocab_strings_and_convention_detection():
    gpt2_like = ListTokenizer(["<|endoftext|>", "Ġthe", "Ġa", "Ċ", None, "Ã¯"])
    sp_like = ListTokenizer(["<pad>", "▁the", "▁a", "<0x0A>", "ï"])
    assert is_byte_level(gpt2_like) and not is_byte_level(sp_like)
    assert vocab_strings(gpt2_like) == ["<|endoftext|>", "▁the", "▁a", "\n", "", "ï"]
    assert vocab_strings(sp_like) == ["<pad>", "▁the", "▁a", "\n", "ï"]
