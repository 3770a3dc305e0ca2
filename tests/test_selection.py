"""DualMinCE: per-sample argmin teacher, kept only where it strictly beats the receiver."""

from __future__ import annotations

import torch

from fedmkt.selection import Selection, dual_min_ce

INF = float("inf")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_picks_argmin_teacher_only_where_it_beats_the_receiver():
    own = t(5.0, 5.0, 5.0, 1.0)
    teachers = {"client_0": t(1.0, 3.0, 6.0, 2.0), "client_1": t(2.0, 0.5, 7.0, 0.9)}
    selection = dual_min_ce(own, teachers)
    assert selection.teachers == ["client_0", "client_1"]
    # sample 0: client_0 (1 < 2 < 5); 1: client_1 (0.5); 2: nobody beats 5; 3: client_1 (0.9 < 1)
    assert selection.teacher_of_sample.tolist() == [0, 1, -1, 1]
    assert selection.teacher_of_sample.dtype == torch.long
    assert selection.num_selected == 3
    assert selection.counts() == {"client_0": 1, "client_1": 2}


def test_ties_with_the_receiver_are_not_selected():
    own = t(2.0, 2.0, 2.0)
    selection = dual_min_ce(own, {"server": t(2.0, 1.999, 2.001)})
    assert selection.teacher_of_sample.tolist() == [-1, 0, -1]
    assert selection.counts() == {"server": 1}


def test_ties_between_teachers_go_to_the_first_name_whatever_the_dict_order():
    own = t(9.0, 9.0)
    losses = {"client_b": t(1.0, 3.0), "client_a": t(1.0, 2.0)}
    selection = dual_min_ce(own, losses)
    assert selection.teachers == ["client_a", "client_b"]
    assert selection.teacher_of_sample.tolist() == [0, 0]
    reordered = dual_min_ce(own, dict(reversed(list(losses.items()))))
    assert torch.equal(reordered.teacher_of_sample, selection.teacher_of_sample)


def test_all_mode_keeps_every_sample_with_its_best_teacher():
    own = t(0.1, 5.0, 0.1)
    teachers = {"client_0": t(1.0, 3.0, 0.5), "client_1": t(2.0, 4.0, 0.4)}
    selection = dual_min_ce(own, teachers, require_improvement=False)
    assert selection.teacher_of_sample.tolist() == [0, 0, 1]
    assert selection.num_selected == 3


def test_missing_teacher_samples_are_never_chosen():
    own = t(5.0, 5.0, 5.0)
    teachers = {"client_0": t(INF, 1.0, INF), "client_1": t(2.0, INF, INF)}
    for require_improvement in (True, False):
        selection = dual_min_ce(own, teachers, require_improvement=require_improvement)
        # sample 2 was scored by nobody: no teacher, even in the "all" ablation
        assert selection.teacher_of_sample.tolist() == [1, 0, -1], require_improvement
        assert selection.counts() == {"client_0": 1, "client_1": 1}


def test_missing_teacher_not_chosen_even_when_receiver_loss_is_infinite():
    selection = dual_min_ce(t(INF, INF), {"server": t(INF, 3.0)})
    assert selection.teacher_of_sample.tolist() == [-1, 0]


def test_no_teachers_selects_nothing():
    selection = dual_min_ce(t(1.0, 2.0), {})
    assert selection.teachers == [] and selection.counts() == {}
    assert selection.teacher_of_sample.tolist() == [-1, -1]
    assert selection.teacher_of_sample.dtype == torch.long
    assert selection.num_selected == 0


def test_half_precision_losses_compare_as_float():
    own = torch.tensor([1.0, 1.0], dtype=torch.float16)
    selection = dual_min_ce(own, {"server": torch.tensor([0.5, 1.5], dtype=torch.bfloat16)})
    assert selection.teacher_of_sample.tolist() == [0, -1]


def test_selection_counts_list_every_teacher_even_with_zero():
    selection = Selection(["a", "b", "c"], torch.tensor([2, -1, 2, 0]))
    assert selection.counts() == {"a": 1, "b": 0, "c": 2}
    assert selection.num_selected == 3


def test_scored_targets_are_the_answer_or_every_next_token_up_to_the_padding():
    from fedmkt.selection import scored_bytes, scored_targets

    input_ids = torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0]])
    targets = torch.tensor([[-100, -100, 8, -100], [9, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(scored_targets(input_ids, targets, "answer", mask), targets)
    expected = torch.tensor([[6, 7, 8, -100], [9, -100, -100, -100]])
    assert torch.equal(scored_targets(input_ids, targets, "all", mask), expected)
    assert torch.equal(scored_targets(input_ids[0], targets[0], "all"), expected[0])
    assert scored_bytes("Q: é?", " b", "answer") == 2 and scored_bytes("Q: é?", " b", "all") == 2 + 6
