"""Top-k re-indexing (vectorised) against a loop reference, and TokenAligner end to end."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.alignment import TokenAligner, align_topk

try:
    import reference_alignment as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_alignment as ref


@st.composite
def reindex_case(draw):
    teacher_len = draw(st.integers(0, 6))
    receiver_len = draw(st.integers(0, 6))
    k = draw(st.integers(1, 5))
    vocab_t = draw(st.integers(1, 8))
    ids = draw(
        st.lists(
            st.lists(st.integers(0, vocab_t + 1), min_size=k, max_size=k), min_size=teacher_len, max_size=teacher_len
        )
    )
    logits = draw(
        st.lists(st.lists(st.floats(-20, 20), min_size=k, max_size=k), min_size=teacher_len, max_size=teacher_len)
    )
    matched = draw(st.lists(st.integers(-1, teacher_len - 1), min_size=receiver_len, max_size=receiver_len))
    vmap = draw(st.lists(st.integers(-1, 4), min_size=vocab_t, max_size=vocab_t))
    fallback = draw(st.lists(st.integers(-1, 4), min_size=receiver_len, max_size=receiver_len))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return ids, logits, matched, vmap, fallback, temperature, k


@settings(max_examples=300, deadline=None)
@given(reindex_case())
def test_align_topk_matches_reference(case):
    ids, logits, matched, vmap, fallback, temperature, k = case
    got_ids, got_probs = align_topk(
        torch.tensor(ids, dtype=torch.long).reshape(len(ids), k),
        torch.tensor(logits, dtype=torch.float32).reshape(len(ids), k),
        torch.tensor(matched, dtype=torch.long),
        torch.tensor(vmap, dtype=torch.long),
        torch.tensor(fallback, dtype=torch.long),
        temperature,
    )
    # The reference works in float64 on float32-rounded inputs.
    logits32 = torch.tensor(logits, dtype=torch.float32).double().tolist()
    exp_ids, exp_probs = ref.align_topk(ids, logits32, matched, vmap, fallback, temperature, k)
    assert got_ids.dtype == torch.long and got_probs.dtype == torch.float32
    assert got_ids.shape == (len(matched), k) == got_probs.shape
    assert got_ids.tolist() == exp_ids
    assert torch.allclose(got_probs, torch.tensor(exp_probs, dtype=torch.float32).reshape(len(matched), k), atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(reindex_case(), st.floats(0.0, 30.0))
def test_align_topk_true_probabilities_match_reference(case, headroom):
    ids, logits, matched, vmap, fallback, temperature, k = case
    # The teacher's log-sum-exp lies `headroom` above its largest sent value: its top-k leave a tail.
    lse = [max(row) / temperature + headroom for row in logits] if logits else []
    got_ids, got_probs = align_topk(
        torch.tensor(ids, dtype=torch.long).reshape(len(ids), k),
        torch.tensor(logits, dtype=torch.float32).reshape(len(ids), k),
        torch.tensor(matched, dtype=torch.long),
        torch.tensor(vmap, dtype=torch.long),
        torch.tensor(fallback, dtype=torch.long),
        temperature,
        torch.tensor(lse, dtype=torch.float32),
    )
    logits32 = torch.tensor(logits, dtype=torch.float32).double().tolist()
    lse32 = torch.tensor(lse, dtype=torch.float32).double().tolist()
    exp_ids, exp_probs = ref.align_topk(ids, logits32, matched, vmap, fallback, temperature, k, lse32)
    assert got_ids.tolist() == exp_ids
    assert torch.allclose(got_probs, torch.tensor(exp_probs, dtype=torch.float32).reshape(len(matched), k), atol=1e-6)
    assert bool((got_probs.sum(-1) <= 1 + 1e-6).all())


def test_align_topk_true_probabilities_example():
    # Teacher ids 5 and 7 map to one receiver id (9): their mass adds up; id 6 is unmapped: its
    # mass stays with the tail. log-sum-exp log(10): the probabilities are exp(logit) / 10.
    ids, probs = align_topk(
        torch.tensor([[5, 6, 7]]),
        torch.tensor([[torch.log(torch.tensor(4.0)), torch.log(torch.tensor(3.0)), 0.0]]),
        torch.tensor([0]),
        torch.tensor([-1, -1, -1, -1, -1, 9, -1, 9]),
        torch.tensor([-1]),
        teacher_logsumexp=torch.log(torch.tensor([10.0])),
    )
    assert ids.tolist() == [[9, -1, -1]]
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.0, 0.0]]))


def test_align_topk_example():
    ids, probs = align_topk(
        torch.tensor([[5, 6, 7], [1, 2, 3]]),
        torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        matched_teacher_pos=torch.tensor([0, -1, -1, 1]),
        vocab_map=torch.tensor([-1, 10, 11, 12, -1, 20, 20, 21]),
        fallback_ids=torch.tensor([9, 4, -1, 9]),
    )
    # Row 0: 5->20, 6->20 (duplicate, dropped), 7->21.
    assert ids.tolist() == [[20, -1, 21], [4, -1, -1], [-1, -1, -1], [10, 11, 12]]
    e = torch.exp(torch.tensor(2.0))
    assert torch.allclose(probs[0], torch.tensor([e / (e + 1), 0.0, 1 / (e + 1)]))
    assert probs[1].tolist() == [1.0, 0.0, 0.0] and probs[2].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(probs[3], torch.full((3,), 1 / 3))


def test_align_topk_rejects_bad_temperature():
    with pytest.raises(ValueError):
        align_topk(
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1),
            torch.tensor([0]),
            torch.tensor([0]),
            torch.tensor([0]),
            0.0,
        )


def test_token_aligner_end_to_end(tmp_path):
    teacher = ref.ListTokenizer(["<pad>", "▁The", "▁quick", "▁brown", "▁fox", "▁jumps"])
    receiver = ref.ListTokenizer(["<|endoftext|>", "ĠThe", "Ġquic", "k", "Ġbrown", "Ġfox", "Ġjump"], byte_level=True)
    aligner = TokenAligner(teacher, receiver, tmp_path, "dtw")
    assert aligner.vocab_map.tolist() == [1, 1, 2, 4, 5, 6]
    t_ids = torch.tensor([1, 2, 3, 4])
    r_ids = torch.tensor([1, 2, 3, 4, 5])
    top_ids = torch.tensor([[2, 5], [3, 5], [4, 5], [5, 4]])
    top_logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ((ids, probs),) = aligner.align([t_ids], [top_ids], [top_logits], [r_ids])
    # Receiver "Ġquic" and "k" both pair with teacher "▁quick": many-to-one, so both fall back to
    # a one-hot on their own next token ("k", then "Ġbrown"). The one-to-one positions take the
    # teacher's top-k at their match.
    assert aligner.match_positions(t_ids, r_ids).tolist() == [0, -1, -1, 2, 3]
    assert ids.tolist() == [[2, 6], [3, -1], [4, -1], [5, 6], [6, 5]]
    assert probs[1].tolist() == probs[2].tolist() == [1.0, 0.0]
    assert torch.allclose(probs.sum(1), torch.ones(5))

    # By offsets "k" ends where "▁quick" ends, so it takes the teacher's top-k there (ids 3, 5 ->
    # receiver 4, 6); "Ġquic" ends inside "▁quick" and still falls back to its next token "k".
    offsets = TokenAligner(teacher, receiver, tmp_path, "offsets")
    assert offsets.match_positions(t_ids, r_ids).tolist() == [0, -1, 1, 2, 3]
    ((ids, probs),) = offsets.align([t_ids], [top_ids], [top_logits], [r_ids])
    assert ids.tolist() == [[2, 6], [3, -1], [4, 6], [5, 6], [6, 5]]
    e = torch.exp(torch.tensor(1.0))
    assert torch.allclose(probs[2], torch.stack([e / (e + 1), 1 / (e + 1)]))

    # Other direction: teacher "▁quick" pairs with receiver "Ġquic" and "k", so that position is not
    # one-to-one and falls back to the receiver's *next* token (id 3), not its own (id 2).
    back = TokenAligner(receiver, teacher, tmp_path, "dtw")
    assert back.match_positions(r_ids, t_ids).tolist() == [0, -1, 3, 4]
    # By offsets teacher "▁quick" meets receiver "k" (both end at byte 10).
    assert TokenAligner(receiver, teacher, tmp_path, "offsets").match_positions(r_ids, t_ids).tolist() == [0, 2, 3, 4]
    ((ids, probs),) = back.align([r_ids], [torch.tensor([[1, 2]] * 5)], [torch.zeros(5, 2)], [t_ids])
    assert ids.tolist() == [[1, 2], [3, -1], [1, 2], [1, 2]]
    assert probs[1].tolist() == [1.0, 0.0] and torch.allclose(probs[[0, 2, 3]], torch.full((3, 2), 0.5))

    # With nothing to match, every position is one-hot on its next token; the last one is empty.
    empty = torch.zeros((0, 2))
    ((ids, probs),) = back.align([torch.zeros(0, dtype=torch.long)], [empty.long()], [empty], [t_ids])
    assert ids.tolist() == [[2, -1], [3, -1], [4, -1], [-1, -1]]
    assert probs.tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]


def test_token_aligner_rejects_an_unknown_sequence_alignment(tmp_path):
    tok = ref.ListTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="sequence_alignment"):
        TokenAligner(tok, tok, tmp_path, "nearest")


def test_token_aligner_rejects_mismatched_lists(tmp_path):
    tok = ref.ListTokenizer(["a", "b"])
    with pytest.raises(ValueError):
        TokenAligner(tok, tok, tmp_path).align([torch.tensor([0])], [], [], [torch.tensor([0])])
