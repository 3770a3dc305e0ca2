"""fedmkt.losses: sparse top-k KD and task CE agree with their dense/torch references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.losses import kd_objective, loss_weights, sparse_kd_loss, token_cross_entropy

try:
    from kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference
except ImportError:  # tests/ imported as a package
    from tests.kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference

TOL = 1e-5


def make_topk(
    batch: int,
    length: int,
    vocab: int,
    k: int,
    seed: int,
    empty_frac: float = 0.2,
    empty_rows: int = 1,
    dtype=torch.float32,
):
    """Distinct top-k ids per position, some -1 slots, some fully empty rows, normalised probs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.argsort(torch.rand(batch, length, vocab, generator=g), dim=-1)[..., :k].clone()
    empty = torch.rand(batch, length, k, generator=g) < empty_frac
    ids[empty] = -1
    flat = ids.view(-1, k)
    for r in torch.randperm(flat.shape[0], generator=g)[:empty_rows]:
        flat[r] = -1
    probs = torch.rand(batch, length, k, generator=g, dtype=torch.float64) + 0.05
    probs = torch.where(ids >= 0, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    # Junk in empty slots must be ignored, not trusted to be 0.
    probs = torch.where(ids >= 0, probs, torch.full_like(probs, 0.3))
    return ids, probs.to(dtype)


def run_both(logits, ids, probs, temperature, kind, chunk_size, weights):
    a = logits.detach().clone().requires_grad_(True)
    b = logits.detach().clone().requires_grad_(True)
    ours = sparse_kd_loss(a, ids, probs, temperature, kind, chunk_size)
    ref = dense_kd_loss_reference(b, ids, probs, temperature, kind)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    return ours, ref, a.grad, b.grad


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_sparse_matches_dense(kind, temperature, k, chunk_size):
    batch, length, vocab = 3, 11, 37
    g = torch.Generator().manual_seed(k * 100 + chunk_size)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    ids, probs = make_topk(batch, length, vocab, k, seed=k + chunk_size)
    weights = torch.randn(batch, length, generator=g)
    ours, ref, ga, gb = run_both(logits, ids, probs, temperature, kind, chunk_size, weights)
    assert ours.shape == (batch, length)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ga, gb, atol=TOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    vocab=st.integers(2, 40),
    k_frac=st.floats(0.01, 1.0),
    chunk_size=st.integers(1, 12),
    temperature=st.sampled_from([0.7, 1.0, 3.0]),
    kind=st.sampled_from(["ce", "kl"]),
    empty_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_sparse_matches_dense_property(batch, length, vocab, k_frac, chunk_size, temperature, kind, empty_frac, seed):
    k = max(1, round(k_frac * vocab))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 4
    ids, probs = make_topk(batch, length, vocab, k, seed, empty_frac, empty_rows=0, dtype=torch.float64)
    weights = torch.randn(batch, length, generator=g, dtype=torch.float64)
    ours, ref, ga, gb = run_both(logits, ids, probs, temperature, kind, chunk_size, weights)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(ga, gb, atol=1e-9, rtol=0)


def test_empty_rows_zero_loss_and_grad():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    ids, probs = make_topk(2, 4, 10, 3, seed=1, empty_rows=0)
    ids[0, 2] = -1
    ids[1] = -1
    loss = sparse_kd_loss(logits, ids, probs, kind="kl", chunk_size=3)
    loss.sum().backward()
    assert loss[0, 2].item() == 0.0 and torch.all(loss[1] == 0)
    assert torch.all(logits.grad[0, 2] == 0) and torch.all(logits.grad[1] == 0)
    assert torch.isfinite(logits.grad).all()


def test_all_slots_empty_is_nan_free_even_with_infinite_logits():
    logits = torch.randn(2, 3, 8)
    logits[0, 0, 0] = float("-inf")  # the dummy id that empty slots are clamped to
    logits = logits.requires_grad_(True)
    ids = torch.full((2, 3, 4), -1)
    probs = torch.rand(2, 3, 4)
    loss = sparse_kd_loss(logits, ids, probs)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(logits.grad == 0)


def test_non_contiguous_logits_not_copied_and_correct():
    full = torch.randn(2, 7, 20)
    view = full[:, :-1]  # the usual "drop last position" slice: cannot be flattened as a view
    assert not view.is_contiguous()
    ids, probs = make_topk(2, 6, 20, 5, seed=3)
    weights = torch.randn(2, 6)
    ours, ref, ga, gb = run_both(view, ids, probs, 1.5, "ce", 4, weights)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ga, gb, atol=TOL, rtol=0)
    x = full.clone().requires_grad_(True)
    loss = sparse_kd_loss(x[:, :-1], ids, probs, 1.5, "ce", 4)
    (loss * weights).sum().backward()
    torch.testing.assert_close(x.grad[:, :-1], gb, atol=TOL, rtol=0)
    assert torch.all(x.grad[:, -1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_grad_matches_and_reuses_storage(dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 5, 30, generator=g).to(dtype)
    ids, probs = make_topk(2, 5, 30, 6, seed=5)
    weights = torch.randn(2, 5, generator=g)
    ref_logits = base.clone().requires_grad_(True)
    ref = sparse_kd_loss(ref_logits, ids, probs, 2.0, "kl", 3)
    (ref * weights).sum().backward()

    # Non-leaf logits, as out of an lm_head: the gradient flows on, written over the logits.
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0
    ptr = logits.data_ptr()
    seen = {}
    logits.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    ours = sparse_kd_loss(logits, ids, probs, 2.0, "kl", 3, inplace_grad=True)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    (ours * weights).sum().backward()
    assert seen["ptr"] == ptr
    torch.testing.assert_close(leaf.grad, ref_logits.grad, atol=TOL, rtol=0)


def test_inplace_grad_refuses_to_corrupt_another_user_of_the_logits():
    logits = torch.randn(2, 4, 12, requires_grad=True) * 1.0
    targets = torch.randint(0, 12, (2, 4))
    ids, probs = make_topk(2, 4, 12, 3, seed=2)
    ce = token_cross_entropy(logits, targets)  # saves the logits for its own backward
    kd = sparse_kd_loss(logits, ids, probs, inplace_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (ce.sum() + kd.sum()).backward()


def test_bf16_logits_match_fp32_reference():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 6, 50, generator=g).to(torch.bfloat16)
    ids, probs = make_topk(2, 6, 50, 8, seed=9)
    a = logits.clone().requires_grad_(True)
    loss = sparse_kd_loss(a, ids, probs, 1.0, "ce", 4)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert a.grad.dtype == torch.bfloat16
    b = logits.float().requires_grad_(True)
    ref = dense_kd_loss_reference(b, ids, probs)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-2, rtol=1e-2)  # bf16 storage


def test_grad_wrt_probs_matches_dense():
    logits = torch.randn(2, 4, 15, dtype=torch.float64)
    ids, probs = make_topk(2, 4, 15, 5, seed=4, dtype=torch.float64)
    for kind in ("ce", "kl"):
        pa = probs.clone().requires_grad_(True)
        pb = probs.clone().requires_grad_(True)
        sparse_kd_loss(logits, ids, pa, 1.3, kind).sum().backward()
        dense_kd_loss_reference(logits, ids, pb, 1.3, kind).sum().backward()
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-9, rtol=0)


def test_kl_is_zero_when_student_equals_teacher():
    vocab = 6
    logits = torch.randn(1, 3, vocab)
    p = torch.softmax(logits, -1)
    ids = torch.arange(vocab).expand(1, 3, vocab).clone()
    loss = sparse_kd_loss(logits, ids, p, kind="kl")
    torch.testing.assert_close(loss, torch.zeros(1, 3), atol=1e-6, rtol=0)


def test_sparse_rejects_bad_input():
    logits = torch.randn(1, 2, 5)
    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    probs = torch.ones(1, 2, 3)
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, ids, probs, kind="js")
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, ids, probs, temperature=0.0)
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, ids + 5, probs)
    with pytest.raises(ValueError):
        sparse_kd_loss(logits, ids, probs, chunk_size=0)


# --- token_cross_entropy ---------------------------------------------------------------------


def reference_ce(logits, targets):
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(1)
    return per_token.sum(1) / counts.clamp(min=1)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 10),
    vocab=st.integers(2, 50),
    chunk_size=st.integers(1, 8),
    ignore_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_token_ce_matches_torch(batch, length, vocab, chunk_size, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[torch.rand(batch, length, generator=g) < ignore_frac] = -100
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = token_cross_entropy(a, targets, chunk_size=chunk_size)
    ref = reference_ce(b, targets)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    w = torch.randn(batch, generator=g)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=TOL, rtol=0)


def test_token_ce_sample_without_labels_is_zero_and_nan_free():
    logits = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.full((2, 5), -100)
    targets[0, 1] = 3
    ce = token_cross_entropy(logits, targets)
    assert ce[1].item() == 0.0
    ce.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[1] == 0)


def test_token_ce_no_grad_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 40, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 40, (3, 7), generator=g)
    targets[0, :2] = -100
    with torch.no_grad():
        ours = token_cross_entropy(logits, targets, chunk_size=4)
    assert ours.dtype == torch.float32 and not ours.requires_grad
    torch.testing.assert_close(ours, reference_ce(logits.float(), targets), atol=TOL, rtol=0)


def test_token_ce_rejects_out_of_range_targets():
    with pytest.raises(ValueError):
        token_cross_entropy(torch.randn(1, 2, 4), torch.tensor([[1, 4]]))
    with pytest.raises(ValueError):
        token_cross_entropy(torch.randn(1, 2, 4), torch.tensor([[1, -2]]))


# --- kd_objective --------------------------------------------------------------------------------


def test_kd_objective_is_a_per_sample_mix():
    # Sample 0 distills positions 0-1 (KD mean 1.5), sample 1 position 0 (KD 4); CE 1 and 3.
    ce = torch.tensor([1.0, 3.0])
    kd = torch.tensor([[1.0, 2.0, 100.0], [4.0, 200.0, 300.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = kd_objective(ce, kd, mask, ce_weight=0.9)
    assert math.isclose(got.item(), ((0.9 * 1 + 0.1 * 1.5) + (0.9 * 3 + 0.1 * 4)) / 2, rel_tol=1e-6)
    assert got.dim() == 0
    # T = 2 multiplies the KD term by T^2 = 4
    got = kd_objective(ce, kd, mask, ce_weight=0.9, temperature=2.0)
    assert math.isclose(got.item(), ((0.9 * 1 + 0.4 * 1.5) + (0.9 * 3 + 0.4 * 4)) / 2, rel_tol=1e-6)


def test_kd_weight_of_a_token_does_not_depend_on_its_batch_mates_selection():
    # Sample 0 is distilled; sample 1 is eligible but DualMinCE did not select it: it adds 0 KD but
    # still counts in the batch mean, so sample 0's KD weighs the same whether or not 1 was selected.
    ce = torch.tensor([1.0, 1.0])
    kd = torch.tensor([[2.0, 4.0, 0.0], [6.0, 8.0, 0.0]], requires_grad=True)
    eligible = torch.tensor([[True, True, False], [True, True, False]])
    only_first = torch.tensor([[True, True, False], [False, False, False]])
    both = eligible.clone()
    kd_objective(ce, kd, only_first, 0.5, eligible).backward()
    alone = kd.grad[0].clone()
    kd.grad = None
    kd_objective(ce, kd, both, 0.5, eligible).backward()
    torch.testing.assert_close(kd.grad[0], alone)
    # (1 - lambda) / (batch 2 * eligible 2) per distilled position
    torch.testing.assert_close(alone, torch.full((3,), 0.5 / 4) * eligible[0])
    got = kd_objective(ce, kd, only_first, 0.5, eligible)
    assert math.isclose(got.item(), ((0.5 * 1 + 0.5 * (2 + 4) / 2) + (0.5 * 1 + 0)) / 2, rel_tol=1e-6)


def test_kd_positions_answer_divides_by_the_answer_positions_only():
    # kd_positions: answer makes only the answer positions eligible: a sample's KD is their mean,
    # however long its prompt (under "all" the prompt positions dilute it).
    ce = torch.tensor([2.0])
    kd = torch.tensor([[1.0, 1.0, 1.0, 5.0, 7.0]])
    answer = torch.tensor([[False, False, False, True, True]])
    every = torch.ones(1, 5, dtype=torch.bool)
    got_answer = kd_objective(ce, kd, answer, 0.5, answer)
    got_all = kd_objective(ce, kd, every, 0.5, every)
    assert math.isclose(got_answer.item(), 0.5 * 2 + 0.5 * (5 + 7) / 2, rel_tol=1e-6)
    assert math.isclose(got_all.item(), 0.5 * 2 + 0.5 * (1 + 1 + 1 + 5 + 7) / 5, rel_tol=1e-6)


def test_loss_weights_per_position():
    has_label = torch.tensor([[False, True, True, False], [False, False, True, False]])
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    eligible = torch.tensor([[True, True, True, False], [True, True, True, False]])
    ce_w, kd_w = loss_weights(has_label, mask, eligible, ce_weight=0.8, temperature=2.0)
    # CE: lambda / (batch 2 * label count); KD: (1 - lambda) * T^2 / (batch 2 * eligible count 3)
    torch.testing.assert_close(ce_w, torch.tensor([[0, 0.2, 0.2, 0], [0, 0, 0.4, 0]]))
    torch.testing.assert_close(kd_w, torch.tensor([[0.8 / 6, 0.8 / 6, 0.8 / 6, 0], [0, 0, 0, 0]]))
    # private data (no KD): the mean over samples of each one's mean CE
    ce_w, kd_w = loss_weights(has_label)
    torch.testing.assert_close(ce_w, torch.tensor([[0, 0.25, 0.25, 0], [0, 0, 0.5, 0]]))
    assert not kd_w.any()


def test_kd_objective_rejects_distilled_positions_that_are_not_eligible():
    mask = torch.tensor([[True, True]])
    with pytest.raises(ValueError, match="eligible"):
        kd_objective(torch.ones(1), torch.ones(1, 2), mask, 0.9, torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="kd_eligible shape"):
        kd_objective(torch.ones(1), torch.ones(1, 2), mask, 0.9, torch.ones(1, 3, dtype=torch.bool))


def test_kd_objective_fully_masked_is_ce_only_and_nan_free():
    ce = torch.tensor([0.5, 1.5], requires_grad=True)
    kd = torch.tensor([[float("nan"), float("inf")]], requires_grad=True).expand(2, 2)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    got = kd_objective(ce, kd, mask, ce_weight=0.9)
    assert math.isclose(got.item(), 0.9, rel_tol=1e-6)
    got.backward()
    assert torch.isfinite(ce.grad).all()


def test_end_to_end_fully_masked_batch_is_nan_free():
    logits = torch.randn(2, 4, 16, requires_grad=True)
    targets = torch.full((2, 4), -100)
    ids = torch.full((2, 4, 5), -1)
    probs = torch.zeros(2, 4, 5)
    ce = token_cross_entropy(logits, targets)
    kd = sparse_kd_loss(logits, ids, probs, kind="kl")
    obj = kd_objective(ce, kd, torch.zeros(2, 4, dtype=torch.bool), 0.9)
    obj.backward()
    assert obj.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_kd_objective_gradient_weights():
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    kd = torch.ones(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    kd_objective(ce, kd, mask, 0.25).backward()
    torch.testing.assert_close(ce.grad, torch.full((2,), 0.25 / 2))
    # sample 0 distills 2 positions, sample 1 one: (1 - lambda) / (2 * count)
    torch.testing.assert_close(kd.grad, torch.tensor([[0.75 / 4, 0, 0.75 / 4], [0, 0, 0.75 / 2]]))


# --- tail targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_tail_matches_the_dense_tail_reference(kind, temperature, chunk_size):
    batch, length, vocab, k = 3, 7, 29, 5
    g = torch.Generator().manual_seed(chunk_size)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.argsort(torch.rand(batch, length, vocab, generator=g), -1)[..., :k].clone()
    ids[torch.rand(batch, length, k, generator=g) < 0.2] = -1
    ids[0, 0] = -1  # a row with no slot: no loss, no tail
    probs = torch.softmax(torch.randn(batch, length, k, generator=g, dtype=torch.float64), -1)
    probs = probs * torch.rand(batch, length, 1, generator=g, dtype=torch.float64)  # leave a tail
    weights = torch.randn(batch, length, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    pa = probs.clone().requires_grad_(True)
    pb = probs.clone().requires_grad_(True)
    ours = sparse_kd_loss(a, ids, pa, temperature, kind, chunk_size, tail=True)
    ref = dense_tail_kd_loss_reference(b, ids, pb, temperature, kind)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)
    listed = ids >= 0
    torch.testing.assert_close(pa.grad * listed, pb.grad * listed, atol=1e-10, rtol=0)
    assert ours[0, 0] == 0 and not a.grad[0, 0].any()


def test_tail_is_the_kd_of_the_full_distribution_coarsened_to_k_plus_one_classes():
    # A teacher whose true distribution is known over the whole vocabulary: its top-3 plus the
    # rest as one class give the same loss as the full KD when the student is the teacher.
    teacher = torch.randn(1, 1, 50, dtype=torch.float64)
    p = torch.softmax(teacher, -1)
    top = p.topk(3, -1)
    kl = sparse_kd_loss(teacher.clone(), top.indices, top.values, kind="kl", tail=True)
    assert abs(kl.item()) < 1e-12  # the student equal to the teacher has nothing left to learn
    renormalized = sparse_kd_loss(teacher.clone(), top.indices, top.values / top.values.sum(), kind="kl")
    assert renormalized.item() > 1e-3  # the renormalised target asks the teacher to be more confident


def test_tail_with_the_whole_mass_listed_is_finite():
    logits = torch.tensor([[[30.0, -30.0, -30.0]]], requires_grad=True)
    loss = sparse_kd_loss(logits, torch.tensor([[[0]]]), torch.tensor([[[0.5]]]), tail=True)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert loss.item() > 10  # the teacher's 50 % outside id 0 is far from the student's ~0


def test_tail_refuses_repeated_ids():
    with pytest.raises(ValueError, match="distinct"):
        sparse_kd_loss(torch.randn(1, 1, 5), torch.tensor([[[1, 1]]]), torch.tensor([[[0.3, 0.3]]]), tail=True)
