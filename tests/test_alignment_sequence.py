"""DTW sequence alignment: identical path to the pure-Python reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.alignment import dtw_path, one_to_one_matches
from fedmkt.alignment.sequence import end_offsets, offset_matches

try:
    import reference_alignment as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_alignment as ref

token = st.text(alphabet="ab▁\nx", min_size=0, max_size=4)
sequence = st.lists(token, min_size=0, max_size=25)


@settings(max_examples=400, deadline=None)
@given(sequence, sequence)
def test_path_matches_reference(a, b):
    assert dtw_path(a, b) == ref.dtw_path(a, b)


@settings(max_examples=300, deadline=None)
@given(sequence, sequence)
def test_one_to_one_matches_reference(teacher, receiver):
    got = one_to_one_matches(teacher, receiver)
    assert got.dtype == np.int64 and got.shape == (len(receiver),)
    assert got.tolist() == ref.one_to_one_matches(teacher, receiver)


@settings(max_examples=100, deadline=None)
@given(sequence.filter(bool), sequence.filter(bool))
def test_path_is_monotone_and_spans_both(a, b):
    path = dtw_path(a, b)
    assert path[0] == (0, 0) and path[-1] == (len(a) - 1, len(b) - 1)
    for (i0, j0), (i1, j1) in zip(path, path[1:]):
        assert (i1 - i0, j1 - j0) in {(1, 1), (1, 0), (0, 1)}


def test_two_tokenisations_of_one_text():
    teacher = ["▁The", "▁quick", "▁brown", "▁fox"]
    receiver = ["▁The", "▁quic", "k", "▁brown", "▁fox"]
    assert dtw_path(teacher, receiver) == [(0, 0), (1, 1), (1, 2), (2, 3), (3, 4)]
    # "▁quic" and "k" share the teacher token "▁quick": many-to-one, so neither is matched
    # (after "▁quic" the next token is "k", not what follows "▁quick").
    assert one_to_one_matches(teacher, receiver).tolist() == [0, -1, -1, 2, 3]
    # By offsets "k" ends where "▁quick" ends, so it takes the teacher's distribution after it.
    assert offset_matches(ref.ends_by_length(teacher), ref.ends_by_length(receiver)).tolist() == [0, -1, 1, 2, 3]
    # Seen from the other side, "▁quick" pairs with two receiver tokens: not one-to-one either.
    assert one_to_one_matches(receiver, teacher).tolist() == [0, -1, 3, 4]


def test_leading_bos_is_not_matched_to_the_first_word():
    # DTW folds a receiver-only <bos> onto the teacher's first word; the teacher's distribution
    # after "In" must not become the target after <bos> (whose next token is "In"), nor after "In".
    teacher = ["In", "▁management", ","]
    receiver = ["<bos>", "In", "▁management", ","]
    assert dtw_path(teacher, receiver)[:2] == [(0, 0), (0, 1)]
    teacher_ends, receiver_ends = np.array([2, 13, 14]), np.array([0, 2, 13, 14])  # <bos> takes no text
    assert one_to_one_matches(teacher, receiver, teacher_ends, receiver_ends).tolist() == [-1, -1, 1, 2]
    # By offsets "In" ends at 2 on both sides, so it is matched; <bos> (end 0) has no partner.
    assert offset_matches(teacher_ends, receiver_ends).tolist() == [-1, 0, 1, 2]


def test_one_to_one_on_the_path_but_ending_elsewhere_is_not_matched():
    # DTW pairs "▁quic" with "▁quick", one-to-one on the path; but "▁quic" ends inside
    # "▁quick", so the teacher's distribution there (which predicts "▁fox") is the wrong target
    # after "▁quic" (whose next token is "k").
    teacher = ["▁the", "▁quick", "▁fox"]
    receiver = ["▁the", "▁quic", "k", "▁fox"]
    assert dtw_path(teacher, receiver) == [(0, 0), (1, 1), (2, 2), (2, 3)]
    # ("▁fox" pairs with both "k" and "▁fox" on the path, so DTW matches only "▁the".)
    assert one_to_one_matches(teacher, receiver).tolist() == [0, -1, -1, -1]
    assert ref.one_to_one_matches(teacher, receiver) == [0, -1, -1, -1]
    # By offsets "k" ends where "▁quick" ends: it is matched there.
    assert offset_matches(ref.ends_by_length(teacher), ref.ends_by_length(receiver)).tolist() == [0, -1, 1, 2]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(token, min_size=1, max_size=3), min_size=0, max_size=12), st.data())
def test_offset_matches_equal_the_oracle(words, data):
    # Two tokenisations of one text: each side splits every word its own way, or adds
    # zero-length tokens (special tokens) between them.
    def split(word: list[str]) -> list[str]:
        text = "".join(word)
        cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=3)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        return [p for p in pieces if p] if data.draw(st.booleans()) else pieces

    teacher = [p for w in words for p in split(w)]
    receiver = [p for w in words for p in split(w)]
    t_ends, r_ends = ref.ends_by_length(teacher), ref.ends_by_length(receiver)
    got = offset_matches(np.array(t_ends, dtype=np.int64), np.array(r_ends, dtype=np.int64))
    assert got.tolist() == ref.offset_oracle(t_ends, r_ends)
    matched = [(i, j) for i, j in enumerate(got.tolist()) if j >= 0]
    assert len({j for _, j in matched}) == len(matched)  # one-to-one both ways
    assert all(r_ends[i] == t_ends[j] for i, j in matched)


def test_end_offsets_count_bytes_and_discount_a_one_sided_prefix_space():
    # "é" split into its two bytes by one side ends only at its second byte.
    t_ends, r_ends = end_offsets([b"caf", b"\xc3", b"\xa9"], [b"", b"caf\xc3\xa9"])
    assert t_ends.tolist() == [3, 4, 5] and r_ends.tolist() == [0, 5]
    assert offset_matches(t_ends, r_ends).tolist() == [-1, 2]
    # A SentencePiece dummy-prefix space that only the teacher has is not text.
    t_ends, r_ends = end_offsets([b" Hello", b" world"], [b"Hello", b" wor", b"ld"])
    assert t_ends.tolist() == [5, 11] and offset_matches(t_ends, r_ends).tolist() == [0, -1, 1]
    # A prompt cut from the left by a different number of bytes on each side: offsets count
    # from where the shorter text starts; the receiver's <bos> (end 0) meets the teacher token
    # ending there, both followed by the same text.
    t_ends, r_ends = end_offsets([b"The", b" qu", b"ick", b" fox"], [b"", b"ick", b" f", b"ox"])
    assert t_ends.tolist() == [-1, 0, 3, 7] and r_ends.tolist() == [0, 3, 5, 7]
    assert offset_matches(t_ends, r_ends).tolist() == [1, 2, -1, 3]
    t_ends, r_ends = end_offsets([b"The", b" qu", b"ick", b" fox"], [b"", b" quick", b" fox"])
    assert offset_matches(t_ends, r_ends).tolist() == [0, 2, 3]
    # Past the point where the texts part (truncation, rewritten characters) nothing matches.
    t_ends, r_ends = end_offsets([b"ab", b"cd", b"ef"], [b"ab", b"cX", b"ef"])
    assert offset_matches(t_ends, r_ends).tolist() == [0, -1, -1]


def test_empty_sequences():
    assert dtw_path([], ["a"]) == [] and dtw_path(["a"], []) == []
    assert one_to_one_matches([], ["a", "b"]).tolist() == [-1, -1]
    assert one_to_one_matches(["a"], []).shape == (0,)
