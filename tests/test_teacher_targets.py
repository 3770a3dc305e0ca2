"""The distillation data path: select (DualMinCE) → align the selected samples → build the data → train.

And the callbacks of that phase, which log the selection and the alignment cache's use but change nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import fedmkt.alignment.vocab_map as vocab_map_module
from fedmkt.callbacks import AlignmentCacheCallback, PhaseProgressBar, SelectiveTransferCallback
from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
from fedmkt.data.datamodule import DistillationDataModule, DistillationTargets, TokenizedSample
from fedmkt.data.tokenize import IGNORE_INDEX
from fedmkt.errors import FedMKTError
from fedmkt.party_module import PartyModule
from fedmkt.payload import KnowledgePayload
from fedmkt.selection import Selection
from fedmkt.teacher_targets import TeacherAligners, select_teachers, teacher_losses

WORDS = ["<pad>"] + [f"\u2581w{i}" for i in range(1, 24)]


class WordTokenizer:
    """The slice of a Hugging Face tokenizer the alignment code reads, over a fixed token list."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.tokens)}


RECEIVER = WordTokenizer(WORDS)
# The teacher spells the same words with other ids (reversed, pad kept at 0).
TEACHER = WordTokenizer([WORDS[0]] + WORDS[1:][::-1])
TO_TEACHER = torch.tensor([0] + list(range(len(WORDS) - 1, 0, -1)))  # receiver id -> teacher id (an involution)


def public_set(lengths=(5, 4, 6, 3), seed=0) -> list[TokenizedSample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for index, length in enumerate(lengths):
        input_ids = torch.randperm(len(WORDS) - 1, generator=g)[:length] + 1  # distinct, never pad
        targets = torch.full((length,), IGNORE_INDEX)
        targets[length // 2 - 1 : -1] = input_ids[length // 2 :]
        samples.append(TokenizedSample(index, input_ids, targets))
    return samples


def teacher_payload(sender, public, scored: dict[int, float], k=4, seed=0) -> KnowledgePayload:
    """The teacher's knowledge on the `scored` public samples (sample -> its loss), in that order."""
    g = torch.Generator().manual_seed(seed)
    order = list(scored)
    token_ids = [TO_TEACHER[public[i].input_ids] for i in order]
    lengths = torch.tensor([len(t) for t in token_ids])
    rows = int(lengths.sum())
    topk_ids = torch.stack([torch.randperm(len(WORDS) - 1, generator=g)[:k] + 1 for _ in range(rows)])
    return KnowledgePayload(
        sender=sender,
        round=1,
        vocab_size=len(WORDS),
        sample_index=torch.tensor(order),
        losses=torch.tensor([scored[i] for i in order]),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        token_ids=torch.cat(token_ids).to(torch.int16),
        topk_ids=topk_ids.to(torch.int16),
        topk_logits=(torch.randn(rows, k, generator=g) * 3).sort(dim=1, descending=True).values.half(),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
    )


@pytest.fixture
def scenario():
    public = public_set()
    payloads = [
        teacher_payload("client_0", public, {0: 0.5, 1: 2.0, 2: 0.2}, seed=1),
        teacher_payload("client_1", public, {3: 0.1, 0: 0.4}, seed=2),  # did not score samples 1 and 2
    ]
    return public, payloads


def aligners(tmp_path, *teachers: str) -> TeacherAligners:
    return TeacherAligners(RECEIVER, {name: TEACHER for name in teachers}, tmp_path)


def by_sender(payloads) -> dict[str, KnowledgePayload]:
    return {p.sender: p for p in payloads}


# ---- selection ----------------------------------------------------------------------------------


def test_teacher_losses_cover_the_public_set_with_inf_where_unscored(scenario):
    _, payloads = scenario
    losses = teacher_losses(by_sender(payloads), num_public=4)
    assert losses["client_0"].tolist() == pytest.approx([0.5, 2.0, 0.2, float("inf")])
    assert losses["client_1"].tolist() == pytest.approx([0.4, float("inf"), float("inf"), 0.1])


def test_select_teachers_picks_the_best_teacher_where_it_beats_the_receiver(scenario):
    _, payloads = scenario
    selection = select_teachers(torch.ones(4), by_sender(payloads))
    # 0: client_1 (0.4 < 0.5 < 1); 1: client_0's 2.0 does not beat 1.0, client_1 missing; 2: client_0; 3: client_1
    assert selection.teachers == ["client_0", "client_1"]
    assert selection.teacher_of_sample.tolist() == [1, -1, 0, 1]
    assert (selection.num_selected, selection.counts()) == (3, {"client_0": 1, "client_1": 2})

    nobody_helps = select_teachers(torch.full((4,), 0.05), by_sender(payloads))
    assert (nobody_helps.num_selected, nobody_helps.counts()) == (0, {"client_0": 0, "client_1": 0})


def test_select_all_mode_keeps_scored_samples_only():
    public = public_set()
    payloads = by_sender([teacher_payload("client_0", public, {0: 9.0, 2: 9.0})])  # samples 1 and 3 unscored
    selection = select_teachers(torch.ones(4), payloads, require_improvement=False)
    assert selection.teacher_of_sample.tolist() == [0, -1, 0, -1]


# ---- alignment ----------------------------------------------------------------------------------


def test_alignment_maps_selected_teacher_topk_onto_receiver_ids(scenario, tmp_path):
    public, payloads = scenario
    payloads = by_sender(payloads)
    selection = select_teachers(torch.ones(4), payloads)
    targets = aligners(tmp_path, "client_0", "client_1").align_selected(selection, payloads, public)

    assert targets.ids[1] is None and targets.probs[1] is None  # not selected
    for sample, teacher in ((0, "client_1"), (2, "client_0"), (3, "client_1")):
        payload = payloads[teacher]
        row = payload.sample_index.tolist().index(sample)
        _, topk_ids, topk_logits = payload.sample(row)
        ids, probs = targets.ids[sample], targets.probs[sample]
        assert ids.dtype == torch.long and probs.dtype == torch.float32
        assert ids.shape == probs.shape == (len(public[sample].input_ids), 4)
        # Same words, other ids: every position matches one-to-one and each id maps back by spelling.
        assert torch.equal(ids, TO_TEACHER[topk_ids])
        torch.testing.assert_close(probs, torch.softmax(topk_logits, dim=-1))

    # The maps live on disk, one per ordered tokenizer pair (both teachers share a tokenizer).
    assert len(list(tmp_path.glob("vocabmap-*.npy"))) == 1


def test_tail_targets_are_the_teachers_true_probabilities(scenario, tmp_path):
    public, payloads = scenario
    payloads = by_sender(payloads)
    selection = select_teachers(torch.ones(4), payloads)
    tail = TeacherAligners(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path, topk_target="tail")
    targets = tail.align_selected(selection, payloads, public)
    payload = payloads["client_0"]
    row = payload.sample_index.tolist().index(2)
    _, topk_ids, topk_logits = payload.sample(row)
    true = (topk_logits - payload.logsumexp_of(row)[:, None]).exp()  # exp(logit - log-sum-exp): below 1 in all
    assert torch.equal(targets.ids[2], TO_TEACHER[topk_ids])
    torch.testing.assert_close(targets.probs[2], true)
    assert bool((targets.probs[2].sum(-1) < 1).all())


def test_tail_targets_refuse_a_logsumexp_taken_at_another_temperature(scenario, tmp_path):
    public, payloads = scenario
    payloads = by_sender(payloads)
    payloads["client_0"].temperature = 2.0
    selection = select_teachers(torch.ones(4), payloads)
    tail = TeacherAligners(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path, topk_target="tail")
    with pytest.raises(FedMKTError, match="temperature 2.0.*Fix: give every party the same transfer.temperature"):
        tail.align_selected(selection, payloads, public)


def test_alignment_reuses_aligners_in_memory_and_maps_from_disk(scenario, tmp_path, monkeypatch):
    public, payloads = scenario
    payloads = by_sender(payloads)
    selection = select_teachers(torch.ones(4), payloads)
    first = aligners(tmp_path, "client_0", "client_1")
    first.align_selected(selection, payloads, public)
    aligner = first.aligner("client_0")
    first.align_selected(selection, payloads, public)
    assert first.aligner("client_0") is aligner  # next round: same in-memory aligner

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the vocabulary map should come from the disk cache")

    monkeypatch.setattr(vocab_map_module, "build_vocab_map", no_rebuild)
    targets = aligners(tmp_path, "client_0", "client_1").align_selected(selection, payloads, public)  # a new run
    assert targets.ids[2] is not None


def test_nothing_selected_aligns_nothing_and_builds_no_map(tmp_path):
    public = public_set()
    payloads = by_sender([teacher_payload("client_0", public, {0: 0.1})])
    selection = select_teachers(torch.full((4,), 0.01), payloads)
    targets = aligners(tmp_path, "client_0").align_selected(selection, payloads, public)
    assert targets.ids == [None] * 4 and targets.probs == [None] * 4
    assert not any(tmp_path.iterdir())  # a teacher no sample chose is never loaded


# ---- in a real Trainer --------------------------------------------------------------------------


def tiny_module(make_tiny_llama) -> PartyModule:
    return PartyModule(
        make_tiny_llama(len(WORDS)),
        LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        OptimizerConfig(lr=1e-2, warmup_ratio=0.0),
        TransferConfig(top_k=4),
        name="server",
    )


def fit(module: PartyModule, data: DistillationDataModule, callbacks=(), logger=False) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(data: DistillationDataModule) -> list[dict]:
    return [{key: value.clone() if torch.is_tensor(value) else value for key, value in i.items()} for i in data.items]


def assert_unchanged(data: DistillationDataModule, before: list[dict]) -> None:
    assert len(data.items) == len(before)
    for item, kept in zip(data.items, before):
        assert item.keys() == kept.keys()
        for key, value in kept.items():
            assert torch.equal(item[key], value) if torch.is_tensor(value) else item[key] == value


def test_the_distillation_data_is_final_before_training_and_unchanged_by_it(scenario, tmp_path, make_tiny_llama):
    public, payloads = scenario
    payloads = by_sender(payloads)
    selection = select_teachers(torch.ones(4), payloads)
    targets = aligners(tmp_path, "client_0", "client_1").align_selected(selection, payloads, public)
    data = DistillationDataModule(public, targets, batch_size=8, pad_id=0, seed=0, top_k=4)
    before = snapshot(data)
    assert [bool(item["kd_mask"].any()) for item in data.items] == [True, False, True, True]

    module = tiny_module(make_tiny_llama)
    fit(module, data)
    assert module.kd_loss.update_count == 1  # one batch of 4 samples, with KD targets
    assert float(module.kd_loss.compute()) > 0
    assert_unchanged(data, before)


# ---- the distillation phase's callbacks: they report, and change nothing ------------------------


def test_selection_callback_logs_the_counts_of_the_selection_it_is_given(scenario, tmp_path, make_tiny_llama):
    public, payloads = scenario
    payloads = by_sender(payloads)
    # Not what DualMinCE picks for these losses (it would take client_1 for samples 0 and 3): the
    # callback reports the selection it was handed, it does not select.
    selection = Selection(["client_0", "client_1"], torch.tensor([0, -1, 0, -1]))
    targets = aligners(tmp_path / "cache", "client_0", "client_1").align_selected(selection, payloads, public)
    data = DistillationDataModule(public, targets, batch_size=2, pad_id=0, seed=0, top_k=4)
    before = snapshot(data)

    logger = CSVLogger(tmp_path, name="logs")
    trainer = fit(tiny_module(make_tiny_llama), data, [SelectiveTransferCallback(selection)], logger)

    counts = {"selected": 2.0, "selected/client_0": 2.0, "selected/client_1": 0.0}
    assert {key: float(trainer.callback_metrics[key]) for key in counts} == counts
    assert {key for key in trainer.progress_bar_metrics if key.startswith("selected")} == {"selected"}
    assert (
        PhaseProgressBar("server · distill · round 1").get_metrics(trainer, trainer.lightning_module)["selected"] == 2
    )
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(row["selected"]) == 2.0 and float(row["selected/client_1"]) == 0.0 for row in rows)
    assert_unchanged(data, before)


def test_cache_callback_reports_a_miss_then_hits_and_never_touches_the_data(
    scenario, tmp_path, make_tiny_llama, monkeypatch
):
    public, payloads = scenario
    payloads = {"client_0": by_sender(payloads)["client_0"]}
    selection = select_teachers(torch.ones(4), payloads)  # samples 0 and 2 (client_0 did not score 3)
    cache = tmp_path / "cache"
    module = tiny_module(make_tiny_llama)

    def phase(receiver: TeacherAligners) -> dict[str, float]:
        data = DistillationDataModule(
            public, receiver.align_selected(selection, payloads, public), batch_size=2, pad_id=0, seed=0, top_k=4
        )
        before = snapshot(data)
        callback = AlignmentCacheCallback(receiver)
        trainer = fit(module, data, [callback])
        assert_unchanged(data, before)
        logged = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("alignment/")}
        assert logged == pytest.approx(callback.metrics)  # float32 in callback_metrics
        assert callback.stats == receiver.last_alignment
        return logged

    first_run = aligners(cache, "client_0")
    built = phase(first_run)
    assert (built["alignment/misses"], built["alignment/hits"], built["alignment/samples"]) == (1, 0, 2)
    assert built["alignment/seconds"] > 0
    assert len(list(cache.glob("vocabmap-*.npy"))) == 1

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the vocabulary map should come from the cache")

    monkeypatch.setattr(vocab_map_module, "build_vocab_map", no_rebuild)
    next_round = phase(first_run)  # the aligner is still in memory
    assert (next_round["alignment/misses"], next_round["alignment/hits"], next_round["alignment/samples"]) == (0, 1, 2)
    next_run = phase(aligners(cache, "client_0"))  # a new run: the map comes from the disk cache
    assert (next_run["alignment/misses"], next_run["alignment/hits"], next_run["alignment/samples"]) == (0, 1, 2)


def test_targets_must_cover_every_public_sample():
    public = public_set()
    with pytest.raises(ValueError, match="targets for 3 public samples do not cover"):
        DistillationDataModule(public, DistillationTargets.empty(3), batch_size=8, pad_id=0, seed=0, top_k=4)
