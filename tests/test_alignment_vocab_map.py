"""MinED vocabulary map: exact against brute force, deterministic tie-break, on-disk cache, JSON."""

import json

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.alignment import build_vocab_map, load_or_build_vocab_map, tokenizer_fingerprint, write_vocab_map_json
from fedmkt.alignment import vocab_map as vocab_map_module
from fedmkt.alignment.vocab_map import load_or_build_vocab_map_hit

try:
    import reference_alignment as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_alignment as ref

# A small alphabet makes exact matches, near matches and ties all common.
token = st.text(alphabet="ab▁é日", min_size=0, max_size=7)
vocab = st.lists(token, min_size=0, max_size=40)


@settings(max_examples=300, deadline=None)
@given(vocab, vocab)
def test_matches_brute_force_including_tie_break(src, dst):
    assert build_vocab_map(src, dst).tolist() == ref.vocab_map(src, dst)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh▁", min_size=1, max_size=30), min_size=1, max_size=30), vocab)
def test_long_tokens_match_brute_force(src, dst):
    assert build_vocab_map(src, dst).tolist() == ref.vocab_map(src, dst)


def test_tie_break_prefers_longest_common_prefix_then_smallest_id():
    dst = ["xbcd", "abcx", "abxd", "zzzz"]
    # "abcd" is at distance 1 from the first three; "abcx" shares the longest prefix.
    assert build_vocab_map(["abcd"], dst).tolist() == [1]
    # Equal distance and equal prefix: the smallest id wins.
    assert build_vocab_map(["q"], ["x", "y", "z"]).tolist() == [0]


def test_exact_match_wins_and_duplicates_take_smallest_id():
    assert build_vocab_map(["▁the", "the"], ["the", "▁the", "▁the"]).tolist() == [1, 0]


def test_byte_fallback_twin_of_an_ordinary_token_is_never_chosen():
    # Gemma-like destination: the byte fallback "<0x2C>" (normalised ",") comes before the real ",".
    raw = ["<pad>", "<0x2C>", "<0xE6>", "▁a", ",", "a,"]
    dst = vocab_map_module.vocab_strings(ref.ListTokenizer(raw))
    assert dst[1] == dst[4] == ","
    # Without the raw spellings, ties (exact or at distance 1) go to the smallest id: the twin.
    assert build_vocab_map([",", "b,"], dst).tolist() == [1, 1]
    assert build_vocab_map([",", "æ", "b,"], dst, raw).tolist() == [4, 2, 4]
    # A byte fallback with no ordinary twin (a lone UTF-8 lead byte) stays a candidate.
    assert vocab_map_module.mapping_candidates(dst, raw) == ["<pad>", "", dst[2], "▁a", ",", "a,"]


def test_special_tokens_only_match_an_identically_spelled_special():
    src = ["<|im_end|>", "<eos>", "<unused>", "eos>"]
    dst = ["<unused0>", "<eos>", "<unused>", "▁eos"]
    # By distance alone, <|im_end|> would take <unused0> and the ordinary "eos>" the special <eos>.
    assert build_vocab_map(src, dst).tolist() == [0, 1, 2, 1]
    # With ids 0-1 special on both sides: <|im_end|> has no twin (-1), <eos> keeps its twin, and the
    # ordinary tokens only see ordinary candidates ("<unused>" is ordinary on both sides here).
    mapped = build_vocab_map(src, dst, src_special={0, 1}, dst_special={0, 1})
    assert mapped.tolist() == [-1, 1, 2, 3]


def test_empty_strings_never_match():
    assert build_vocab_map(["", "a"], ["", "b", "a"]).tolist() == [-1, 2]
    assert build_vocab_map(["a"], ["", ""]).tolist() == [-1]
    assert build_vocab_map([], ["a"]).shape == (0,)


def test_result_dtype_and_shape():
    out = build_vocab_map(["a", "b", "c"], ["a"])
    assert out.dtype == np.int64 and out.shape == (3,)


def test_fingerprint_depends_on_content_not_name():
    a = ref.ListTokenizer(["<pad>", "▁the", "▁a"])
    same = ref.ListTokenizer(["<pad>", "▁the", "▁a"])
    other = ref.ListTokenizer(["<pad>", "▁a", "▁the"])
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(same)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(other)
    assert len(tokenizer_fingerprint(a)) == 64


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    src = ref.ListTokenizer(["<pad>", "▁the", "▁cat", "s"])
    dst = ref.ListTokenizer(["Ġthe", "Ġca", "s", "<|endoftext|>"], byte_level=True)
    first = load_or_build_vocab_map(src, dst, tmp_path)
    assert first.dtype == torch.long and first.tolist() == [1, 0, 1, 2]  # "<pad>" is nearest "▁ca" (shares "a")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    assert np.load(files[0], allow_pickle=False).tolist() == first.tolist()

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(vocab_map_module, "build_vocab_map", fail)
    assert load_or_build_vocab_map(src, dst, tmp_path).tolist() == first.tolist()
    # Same content under another object: still a cache hit.
    assert load_or_build_vocab_map(ref.ListTokenizer(list(src.tokens)), dst, tmp_path).tolist() == first.tolist()


def test_corrupt_cache_is_rebuilt(tmp_path):
    src = ref.ListTokenizer(["▁a", "▁b"])
    dst = ref.ListTokenizer(["▁b", "▁a"])
    expected = load_or_build_vocab_map(src, dst, tmp_path).tolist()
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not an npy file")
    assert load_or_build_vocab_map(src, dst, tmp_path).tolist() == expected


def test_the_cache_says_whether_it_hit(tmp_path):
    src = ref.ListTokenizer(["▁a", "▁b"])
    dst = ref.ListTokenizer(["▁b", "▁a"])
    built, hit = load_or_build_vocab_map_hit(src, dst, tmp_path)
    assert not hit and built.tolist() == [1, 0]
    cached, hit = load_or_build_vocab_map_hit(src, dst, tmp_path)
    assert hit and cached.tolist() == [1, 0]
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not an npy file")
    assert load_or_build_vocab_map_hit(src, dst, tmp_path)[1] is False  # an unreadable file is no hit


def test_write_vocab_map_json(tmp_path):
    src = ref.ListTokenizer(["<pad>", "▁the", "▁cat", None])
    dst = ref.ListTokenizer(["Ġthe", "Ġcat", "<|endoftext|>"], byte_level=True)
    out = write_vocab_map_json(src, dst, tmp_path / "sub" / "map.json", cache_dir=tmp_path / "cache")
    table = json.loads(out.read_text(encoding="utf-8"))
    assert table == {"<pad>": "Ġcat", "▁the": "Ġthe", "▁cat": "Ġcat"}
    again = write_vocab_map_json(src, dst, tmp_path / "nocache.json")
    assert json.loads(again.read_text(encoding="utf-8")) == table


def test_sources_longer_than_a_machine_word():
    # Sources over 64 characters take the plain DP path instead of the bit-parallel one.
    rng = __import__("random").Random(3)
    src = ["".join(rng.choice("ab▁") for _ in range(rng.randint(60, 90))) for _ in range(6)]
    dst = ["".join(rng.choice("ab▁") for _ in range(rng.randint(1, 90))) for _ in range(25)]
    assert build_vocab_map(src, dst).tolist() == ref.vocab_map(src, dst)
