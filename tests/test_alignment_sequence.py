"""DTW sequence alignment: identical path to the pure-Python reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.alignment import dtw_path, one_to_one_matches

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
    # Seen from the other side, "▁quick" pairs with two receiver tokens: not one-to-one either.
    assert one_to_one_matches(receiver, teacher).tolist() == [0, -1, 3, 4]


def test_leading_bos_is_not_matched_to_the_first_word():
    # DTW folds a receiver-only <bos> onto the teacher's first word; the teacher's distribution
    # after "In" must not become the target after <bos> (whose next token is "In"), nor after "In".
    teacher = ["In", "▁management", ","]
    receiver = ["<bos>", "In", "▁management", ","]
    assert dtw_path(teacher, receiver)[:2] == [(0, 0), (0, 1)]
    assert one_to_one_matches(teacher, receiver).tolist() == [-1, -1, 1, 2]


def test_empty_sequences():
    assert dtw_path([], ["a"]) == [] and dtw_path(["a"], []) == []
    assert one_to_one_matches([], ["a", "b"]).tolist() == [-1, -1]
    assert one_to_one_matches(["a"], []).shape == (0,)
