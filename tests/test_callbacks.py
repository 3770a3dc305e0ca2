"""SelectiveTransferCallback and AlignmentCacheCallback, as they run in a distillation Trainer's setup."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

import fedmkt.alignment.vocab_map as vocab_map_module
from fedmkt.callbacks import AlignmentCacheCallback, SelectiveTransferCallback
from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
from fedmkt.data.datamodule import DistillationDataModule, TokenizedSample
from fedmkt.data.tokenize import IGNORE_INDEX
from fedmkt.party import PartyModule
from fedmkt.payload import KnowledgePayload

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
    )


def distill_data(public, payloads, own_losses, top_k=4) -> DistillationDataModule:
    return DistillationDataModule(
        receiver="server",
        public=public,
        teacher_payloads={p.sender: p for p in payloads},
        own_losses=torch.tensor(own_losses),
        batch_size=8,
        pad_id=0,
        seed=0,
        top_k=top_k,
    )


def run_setup(callbacks, data) -> None:
    trainer = SimpleNamespace(datamodule=data)
    for callback in callbacks:
        callback.setup(trainer, None, "fit")


@pytest.fixture
def scenario():
    public = public_set()
    payloads = [
        teacher_payload("client_0", public, {0: 0.5, 1: 2.0, 2: 0.2}, seed=1),
        teacher_payload("client_1", public, {3: 0.1, 0: 0.4}, seed=2),  # did not score samples 1 and 2
    ]
    return public, payloads


# ---- selective transfer -------------------------------------------------------------------------


def test_selective_transfer_fills_selection_and_records_teacher_counts(scenario):
    public, payloads = scenario
    data = distill_data(public, payloads, [1.0, 1.0, 1.0, 1.0])
    callback = SelectiveTransferCallback()
    assert callback.last == {"selected": 0, "teacher_counts": {}}
    run_setup([callback], data)
    # 0: client_1 (0.4 < 0.5 < 1); 1: client_0's 2.0 does not beat 1.0, client_1 missing; 2: client_0; 3: client_1
    assert data.selection.teachers == ["client_0", "client_1"]
    assert data.selection.teacher_of_sample.tolist() == [1, -1, 0, 1]
    assert callback.history == [{"selected": 3, "teacher_counts": {"client_0": 1, "client_1": 2}}]

    run_setup([callback], distill_data(public, payloads, [0.05, 0.05, 0.05, 0.05]))  # next phase: nobody helps
    assert callback.last == {"selected": 0, "teacher_counts": {"client_0": 0, "client_1": 0}}
    assert len(callback.history) == 2


def test_selective_transfer_all_mode_keeps_scored_samples_only(tmp_path):
    public = public_set()
    payloads = [teacher_payload("client_0", public, {0: 9.0, 2: 9.0})]  # samples 1 and 3 unscored
    data = distill_data(public, payloads, [1.0, 1.0, 1.0, 1.0])
    callback = SelectiveTransferCallback(require_improvement=False)
    run_setup([callback, AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER}, tmp_path)], data)
    assert data.selection.teacher_of_sample.tolist() == [0, -1, 0, -1]
    assert callback.last["selected"] == 2
    assert [ids is not None for ids in data.targets.ids] == [True, False, True, False]


def test_callbacks_ignore_other_datamodules(tmp_path):
    selective = SelectiveTransferCallback()
    alignment = AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER}, tmp_path)
    other = SimpleNamespace(selection=None, targets=None)
    run_setup([selective, alignment], other)
    assert selective.history == [] and other.targets is None
    assert not any(tmp_path.iterdir())


# ---- alignment ----------------------------------------------------------------------------------


def test_alignment_maps_selected_teacher_topk_onto_receiver_ids(scenario, tmp_path):
    public, payloads = scenario
    data = distill_data(public, payloads, [1.0, 1.0, 1.0, 1.0])
    alignment = AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path)
    run_setup([SelectiveTransferCallback(), alignment], data)

    assert data.targets.ids[1] is None and data.targets.probs[1] is None  # not selected
    for sample, teacher in ((0, "client_1"), (2, "client_0"), (3, "client_1")):
        payload = data.teacher_payloads[teacher]
        row = payload.sample_index.tolist().index(sample)
        _, topk_ids, topk_logits = payload.sample(row)
        ids, probs = data.targets.ids[sample], data.targets.probs[sample]
        assert ids.dtype == torch.long and probs.dtype == torch.float32
        assert ids.shape == probs.shape == (len(public[sample].input_ids), 4)
        # Same words, other ids: every position matches one-to-one and each id maps back by spelling.
        assert torch.equal(ids, TO_TEACHER[topk_ids])
        torch.testing.assert_close(probs, torch.softmax(topk_logits, dim=-1))

    # The maps live on disk, one per ordered tokenizer pair (both teachers share a tokenizer).
    assert len(list(tmp_path.glob("vocabmap-*.npy"))) == 1


def test_alignment_reuses_aligners_in_memory_and_maps_from_disk(scenario, tmp_path, monkeypatch):
    public, payloads = scenario
    first = AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path)
    run_setup([SelectiveTransferCallback(), first], distill_data(public, payloads, [1.0] * 4))
    aligner = first.aligner("client_0")
    run_setup([SelectiveTransferCallback(), first], distill_data(public, payloads, [1.0] * 4))
    assert first.aligner("client_0") is aligner  # next round: same in-memory aligner

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the vocabulary map should come from the disk cache")

    monkeypatch.setattr(vocab_map_module, "build_vocab_map", no_rebuild)
    data = distill_data(public, payloads, [1.0] * 4)
    second = AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path)  # a new run
    run_setup([SelectiveTransferCallback(), second], data)
    assert data.targets.ids[2] is not None


def test_alignment_without_selection_leaves_targets_empty(tmp_path):
    public = public_set()
    data = distill_data(public, [teacher_payload("client_0", public, {0: 0.1})], [1.0] * 4)
    AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER}, tmp_path).setup(
        SimpleNamespace(datamodule=data), None, "fit"
    )
    assert data.targets is None


# ---- in a real Trainer --------------------------------------------------------------------------


def test_callbacks_run_in_trainer_setup_before_the_dataloader(scenario, tmp_path, make_tiny_llama):
    public, payloads = scenario
    data = distill_data(public, payloads, [1.0, 1.0, 1.0, 1.0])
    module = PartyModule(
        make_tiny_llama(len(WORDS)),
        LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        OptimizerConfig(lr=1e-2, warmup_ratio=0.0),
        TransferConfig(top_k=4),
        name="server",
    )
    selective = SelectiveTransferCallback()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[selective, AlignmentCacheCallback(RECEIVER, {"client_0": TEACHER, "client_1": TEACHER}, tmp_path)],
    )
    trainer.fit(module, datamodule=data)
    assert selective.last == {"selected": 3, "teacher_counts": {"client_0": 1, "client_1": 2}}
    assert module.kd_loss.update_count == 1  # one batch of 4 samples, with KD targets
    assert float(module.kd_loss.compute()) > 0
