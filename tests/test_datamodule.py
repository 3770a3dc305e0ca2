"""PartyDataModule (private / public loaders) and DistillationDataModule (KD items and masks)."""

from __future__ import annotations

import pytest
import torch

from fedmkt.data.datamodule import (
    DistillationDataModule,
    DistillationTargets,
    PartyDataModule,
    TokenizedSample,
    tokenize_examples,
)
from fedmkt.data.tasks import QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, encode_prompt_answer
from fedmkt.errors import FedMKTError


def examples(n: int, tag: str = "q") -> list[QAExample]:
    return [
        QAExample(
            f"{tag}{i}", f"Question: {'why ' * (i % 3)}is item {tag}{i} here?\nAnswer:", (" yes", " no indeed"), i % 2
        )
        for i in range(n)
    ]


def party_data(tokenizer, private=5, public=4, batch_size=2, seed=0) -> PartyDataModule:
    return PartyDataModule(
        "client_0",
        examples(private, "p"),
        examples(public, "u"),
        tokenizer,
        max_length=48,
        batch_size=batch_size,
        eval_batch_size=3,
        seed=seed,
    )


# ---- PartyDataModule ----------------------------------------------------------------------------


def test_tokenize_examples_indexes_by_position_and_trains_on_the_answer(smollm2_tokenizer):
    items = examples(3)
    samples = tokenize_examples(items, smollm2_tokenizer, max_length=48)
    assert [s.index for s in samples] == [0, 1, 2]
    for sample, example in zip(samples, items):
        input_ids, targets = encode_prompt_answer(smollm2_tokenizer, example.prompt, example.answer, 48)
        assert torch.equal(sample.input_ids, input_ids) and torch.equal(sample.targets, targets)
        answer = smollm2_tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        assert sample.targets[sample.targets != IGNORE_INDEX].tolist() == answer


def test_empty_public_set_is_a_one_line_error(smollm2_tokenizer):
    with pytest.raises(FedMKTError, match=r"public dataset is empty\. Fix: .*data\.pool_size"):
        PartyDataModule("server", examples(2), [], smollm2_tokenizer, 48, 2, 2, 0)


def test_no_private_data_is_an_error_naming_the_party(smollm2_tokenizer):
    data = party_data(smollm2_tokenizer, private=0)
    with pytest.raises(FedMKTError, match=r"client_0 has no private data\. Fix:"):
        data.train_dataloader()


def test_predict_dataloader_covers_the_public_set_longest_first_with_padding(smollm2_tokenizer):
    data = party_data(smollm2_tokenizer, public=4)
    assert data.pad_id == smollm2_tokenizer.pad_token_id
    batches = list(data.predict_dataloader())
    assert [len(b["index"]) for b in batches] == [3, 1]
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(order) == [0, 1, 2, 3]
    lengths_in_order = [len(data.public[i].input_ids) for i in order]
    assert lengths_in_order == sorted(lengths_in_order, reverse=True)  # similar lengths share a batch
    first = batches[0]
    lengths = lengths_in_order[:3]
    assert first["input_ids"].shape == (3, max(lengths))
    assert first["attention_mask"].sum(-1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert torch.equal(first["input_ids"][row, :length], data.public[order[row]].input_ids)
        assert (first["input_ids"][row, length:] == data.pad_id).all()
        assert (first["targets"][row, length:] == IGNORE_INDEX).all()


def test_train_dataloader_shuffles_the_private_set_reproducibly(smollm2_tokenizer):
    def order(data) -> list[int]:
        return torch.cat([b["index"] for b in data.train_dataloader()]).tolist()

    first = order(party_data(smollm2_tokenizer, private=8, seed=3))
    assert sorted(first) == list(range(8))
    assert first == order(party_data(smollm2_tokenizer, private=8, seed=3))
    assert first != list(range(8))  # shuffled (this seed does not give the identity)


# ---- DistillationDataModule ---------------------------------------------------------------------


def sample(index: int, length: int, answer_from: int) -> TokenizedSample:
    input_ids = torch.arange(10, 10 + length)
    targets = torch.full((length,), IGNORE_INDEX)
    targets[answer_from - 1 : -1] = input_ids[answer_from:]
    return TokenizedSample(index, input_ids, targets)


def distill_data(public, targets=None, top_k=3, kd_positions="all") -> DistillationDataModule:
    targets = DistillationTargets.empty(len(public)) if targets is None else targets
    return DistillationDataModule(
        public=public, targets=targets, batch_size=8, pad_id=0, seed=0, top_k=top_k, kd_positions=kd_positions
    )


def targets_for(public, selected: dict[int, int], width=3, seed=0) -> DistillationTargets:
    """Aligned targets for the selected samples (full rows of `width` slots), None elsewhere."""
    g = torch.Generator().manual_seed(seed)
    targets = DistillationTargets.empty(len(public))
    for i in selected:
        length = len(public[i].input_ids)
        targets.ids[i] = torch.randint(100, (length, width), generator=g)
        targets.probs[i] = torch.softmax(torch.randn(length, width, generator=g), dim=-1)
    return targets


def items_by_index(data: DistillationDataModule) -> dict[int, dict]:
    return {int(item["index"]): item for item in data.items}


def test_without_targets_nothing_is_distilled():
    data = distill_data([sample(0, 5, 3), sample(1, 4, 2)])
    batch = next(iter(data.train_dataloader()))
    assert not batch["kd_mask"].any()
    assert (batch["kd_ids"] == -1).all() and (batch["kd_probs"] == 0).all()
    assert batch["kd_ids"].shape == (2, 5, 3)


def test_selected_samples_get_their_targets_and_unselected_are_masked():
    public = [sample(0, 5, 3), sample(1, 4, 2), sample(2, 6, 4)]
    targets = targets_for(public, {0: 0, 2: 0})
    data = distill_data(public, targets)
    items = items_by_index(data)

    for i in (0, 2):
        length = len(public[i].input_ids)
        assert torch.equal(items[i]["kd_ids"], targets.ids[i])
        assert torch.equal(items[i]["kd_probs"], targets.probs[i])
        # every position distilled except the last, which has no next token
        assert items[i]["kd_mask"].tolist() == [True] * (length - 1) + [False]
    assert not items[1]["kd_mask"].any() and (items[1]["kd_ids"] == -1).all()
    # Eligible (the KD denominator) whether selected or not: every position but the last.
    for i in (0, 1, 2):
        assert items[i]["kd_eligible"].tolist() == [True] * (len(public[i].input_ids) - 1) + [False]

    batch = next(iter(data.train_dataloader()))
    order = batch["index"].tolist()
    assert sorted(order) == [0, 1, 2]
    for row, i in enumerate(order):
        length = len(public[i].input_ids)
        assert torch.equal(batch["kd_mask"][row, :length], items[i]["kd_mask"])
        assert not batch["kd_mask"][row, length:].any()  # padding is never distilled
        assert not batch["kd_eligible"][row, length:].any()  # nor counted in the KD denominator
        assert (batch["kd_ids"][row, length:] == -1).all()
        assert torch.equal(batch["input_ids"][row, :length], public[i].input_ids)


def test_every_epoch_reads_the_same_items():
    public = [sample(0, 5, 3), sample(1, 4, 2)]
    data = distill_data(public, targets_for(public, {1: 0}))
    first, second = next(iter(data.train_dataloader())), next(iter(data.train_dataloader()))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key])  # same seed, same items: nothing changed in between


def test_answer_positions_mode_masks_the_prompt():
    public = [sample(0, 7, 4)]  # answer tokens at 4..6: positions 3, 4, 5 predict them
    data = distill_data(public, targets_for(public, {0: 0}), kd_positions="answer")
    item = data.items[0]
    assert item["kd_mask"].tolist() == [False, False, False, True, True, True, False]
    assert torch.equal(item["kd_mask"], public[0].targets != IGNORE_INDEX)
    assert torch.equal(item["kd_eligible"], public[0].targets != IGNORE_INDEX)


def test_empty_target_rows_are_masked():
    public = [sample(0, 5, 3)]
    targets = targets_for(public, {0: 0})
    targets.ids[0][1] = -1  # an unmatched position with no fallback: empty row
    targets.probs[0][1] = 0.0
    assert distill_data(public, targets).items[0]["kd_mask"].tolist() == [True, False, True, True, False]


def test_narrow_targets_are_padded_and_wide_ones_cut_to_top_k():
    public = [sample(0, 4, 2), sample(1, 4, 2)]
    targets = targets_for(public, {0: 0}, width=2)
    wide = targets_for(public, {1: 0}, width=5, seed=1)
    targets.ids[1], targets.probs[1] = wide.ids[1], wide.probs[1]

    narrow_item, wide_item = distill_data(public, targets, top_k=3).items
    assert narrow_item["kd_ids"].shape == wide_item["kd_ids"].shape == (4, 3)
    assert torch.equal(narrow_item["kd_ids"][:, :2], targets.ids[0])
    assert (narrow_item["kd_ids"][:, 2] == -1).all() and (narrow_item["kd_probs"][:, 2] == 0).all()
    assert torch.equal(wide_item["kd_ids"], wide.ids[1][:, :3])
    assert torch.equal(wide_item["kd_probs"], wide.probs[1][:, :3])
