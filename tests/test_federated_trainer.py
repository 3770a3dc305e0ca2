"""FederatedTrainer (round protocol, byte counting, summary.json, results table) and Participant phases."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import fedmkt.files as files_module
from fedmkt.config import LoRAConfig, ModelSpec, OptimizerConfig, PartyConfig, RunConfig, TrainerConfig, TransferConfig
from fedmkt.data.datamodule import DistillationDataModule, PartyDataModule, _loader
from fedmkt.data.examples import without_answer
from fedmkt.data.tasks import QAExample
from fedmkt.errors import FedMKTError
from fedmkt.federation.participant import Participant
from fedmkt.federation.protocol import PhaseStats
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.files import atomic_write_text
from fedmkt.party_module import PartyModule
from fedmkt.payload import KnowledgePayload

PUBLIC = 4


def payload(
    sender: str, round_index: int = 1, n: int = PUBLIC, length: int = 3, k: int = 2, seed: int = 0
) -> KnowledgePayload:
    g = torch.Generator().manual_seed(seed)
    rows = n * length
    return KnowledgePayload(
        sender=sender,
        round=round_index,
        vocab_size=100,
        sample_index=torch.arange(n),
        losses=torch.rand(n, generator=g),
        offsets=torch.arange(0, rows + 1, length),
        token_ids=torch.randint(100, (rows,), generator=g).to(torch.int16),
        topk_ids=torch.randint(100, (rows, k), generator=g).to(torch.int16),
        topk_logits=torch.randn(rows, k, generator=g).half(),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
    )


def strict_json(text: str):
    """Parse as standard JSON (NaN / Infinity are not JSON; other tools reject them)."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


class FakeParty:
    """A participant that records the protocol's calls and answers with fixed numbers."""

    def __init__(self, name: str, calls: list, task_loss: float = 1.0, seed: int = 0) -> None:
        self.name, self.calls, self.task_loss, self.seed = name, calls, task_loss, seed
        self.num_public = PUBLIC
        self.sent: list[KnowledgePayload] = []
        self.received: list[dict] = []

    def fine_tune(self, round_index):
        self.calls.append((self.name, "fine_tune", round_index))
        return PhaseStats(task_loss=self.task_loss, train_seconds=0.5)

    def share_knowledge(self, round_index):
        self.calls.append((self.name, "share", round_index))
        self.sent.append(payload(self.name, round_index, seed=self.seed + round_index))
        return self.sent[-1]

    def distill(self, round_index, teacher_payloads):
        self.calls.append((self.name, "distill", round_index, tuple(sorted(teacher_payloads))))
        self.received.append(teacher_payloads)
        counts = {name: 1 for name in teacher_payloads}
        return PhaseStats(task_loss=2.0, kd_loss=0.25, train_seconds=1.0, selected=len(counts), teacher_counts=counts)

    def evaluate(self):
        return {"eval_accuracy": 0.5 + 0.1 * len(self.received), "eval_accuracy_norm": 0.5, "eval_seconds": 0.1}

    def save_adapter(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_model.safetensors").write_bytes(b"")

    def cached_public_losses(self):
        return None


class FakeLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))

    def save(self):
        pass


def run_config(rounds: int = 2, clients: int = 2) -> RunConfig:
    config = RunConfig(
        server=PartyConfig(model=ModelSpec("embedded:gemma3-270m")),
        clients=[PartyConfig(model=ModelSpec("embedded:smollm2-135m-instruct")) for _ in range(clients)],
    )
    config.federation.rounds = rounds
    return config


@pytest.fixture
def federation(tmp_path):
    calls: list = []
    server = FakeParty("server", calls, seed=100)
    clients = [FakeParty("client_0", calls, seed=200), FakeParty("client_1", calls, seed=300)]
    logger = FakeLogger()
    trainer = FederatedTrainer(server, clients, run_config(), tmp_path / "run", loggers=[logger])
    return SimpleNamespace(
        trainer=trainer, server=server, clients=clients, calls=calls, logger=logger, run_dir=tmp_path / "run"
    )


# ---- _send -------------------------------------------------------------------------------------


def test_send_counts_bytes_on_both_ends_and_hands_over_a_validated_copy(federation):
    trainer, server, clients = federation.trainer, federation.server, federation.clients
    sent = payload("server")
    size = len(sent.to_bytes())
    received = trainer._send(sent, receivers=clients)
    assert trainer._traffic["server"] == {"bytes_sent": 2 * size, "bytes_received": 0}
    assert trainer._traffic["client_0"] == trainer._traffic["client_1"] == {"bytes_sent": 0, "bytes_received": size}
    assert received is not sent and isinstance(received, KnowledgePayload)
    for name in ("sample_index", "losses", "offsets", "token_ids", "topk_ids", "topk_logits"):
        assert torch.equal(getattr(received, name), getattr(sent, name))

    trainer._send(payload("client_0", seed=5), receivers=[server])  # counts add up within a round
    client_size = len(payload("client_0", seed=5).to_bytes())
    assert trainer._traffic["client_0"] == {"bytes_sent": client_size, "bytes_received": size}
    assert trainer._traffic["server"]["bytes_received"] == client_size


def test_send_rejects_a_nan_payload(federation):
    bad = payload("client_0")
    bad.topk_logits[2, 1] = float("nan")
    with pytest.raises(FedMKTError, match=r"rejected payload from client_0: .*NaN/inf.*Fix:"):
        federation.trainer._send(bad, receivers=[federation.server])


def test_send_rejects_samples_outside_the_receivers_public_set(federation):
    too_many = payload("client_0", n=PUBLIC + 1)
    with pytest.raises(FedMKTError, match=rf"sample_index outside the public dataset of {PUBLIC} samples"):
        federation.trainer._send(too_many, receivers=[federation.server])


# ---- the round protocol ------------------------------------------------------------------------


def test_run_round_follows_the_protocol_and_records_every_party(federation):
    trainer, server, clients = federation.trainer, federation.server, federation.clients
    record = trainer.run_round(1)
    assert federation.calls == [
        ("client_0", "fine_tune", 1),
        ("client_1", "fine_tune", 1),
        ("client_0", "share", 1),
        ("client_1", "share", 1),
        ("server", "distill", 1, ("client_0", "client_1")),
        ("server", "share", 1),
        ("client_0", "distill", 1, ("server",)),
        ("client_1", "distill", 1, ("server",)),
    ]
    # what each receiver distilled from is a copy of what the sender shared, not the object itself
    got = server.received[0]["client_1"]
    assert got is not clients[1].sent[0] and torch.equal(got.topk_ids, clients[1].sent[0].topk_ids)

    sizes = {p.name: len(p.sent[0].to_bytes()) for p in (server, *clients)}
    parties = record["parties"]
    assert record["round"] == 1 and set(parties) == {"server", "client_0", "client_1"}
    assert parties["server"]["bytes_sent"] == 2 * sizes["server"]
    assert parties["server"]["bytes_received"] == sizes["client_0"] + sizes["client_1"]
    for client in clients:
        entry = parties[client.name]
        assert entry["bytes_sent"] == sizes[client.name] and entry["bytes_received"] == sizes["server"]
        assert entry["task_loss"] == 1.0 and entry["distill_task_loss"] == 2.0 and entry["kd_loss"] == 0.25
        assert entry["selected"] == 1 and entry["teacher_counts"] == {"server": 1}
        assert entry["train_seconds"] == 1.5 and entry["eval_accuracy"] == pytest.approx(0.6)
    assert parties["server"]["selected"] == 2 and parties["server"]["teacher_counts"] == {"client_0": 1, "client_1": 1}
    for key in ("task_loss", "kd_loss", "selected", "bytes_sent", "bytes_received", "eval_accuracy"):
        assert all(key in entry for entry in parties.values()), key

    for name in parties:
        assert (federation.run_dir / "adapters" / "round_1" / name / "adapter_model.safetensors").is_file()
    on_disk = strict_json((federation.run_dir / "summary.json").read_text())
    assert on_disk["rounds"] == [record]

    # Each party's timeline: the phases it ran this round, in order, each a span of wall-clock time.
    phases = {name: [span["phase"] for span in entry["timeline"]] for name, entry in parties.items()}
    assert phases["server"] == ["distill", "share_knowledge", "evaluate", "save_adapter"]
    for client in clients:
        assert phases[client.name] == ["fine_tune", "share_knowledge", "distill", "evaluate", "save_adapter"]
    for entry in parties.values():
        spans = entry["timeline"]
        assert all(span["start"] <= span["end"] for span in spans)
        assert all(a["end"] <= b["start"] for a, b in zip(spans, spans[1:]))  # in-process: one phase at a time


def test_traffic_is_counted_per_round(federation):
    first = federation.trainer.run_round(1)["parties"]
    second = federation.trainer.run_round(2)["parties"]
    for name in first:  # same payload sizes each round: counts must not accumulate across rounds
        assert second[name]["bytes_sent"] == first[name]["bytes_sent"] > 0
        assert second[name]["bytes_received"] == first[name]["bytes_received"] > 0


def test_fit_runs_every_round_after_zero_shot_and_logs_namespaced_metrics(federation):
    summary = federation.trainer.fit()
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert set(summary["zero_shot"]) == {"server", "client_0", "client_1"}
    assert summary["config"]["federation"]["rounds"] == 2
    assert strict_json((federation.run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))

    steps = [step for step, _ in federation.logger.logged]
    assert steps == [0, 1, 2]
    zero, first = federation.logger.logged[0][1], federation.logger.logged[1][1]
    # Zero-shot logs every score a party reports (n and interval included), namespaced by party.
    assert zero == {"round": 0} | {
        f"{party}/{key}": value
        for party in ("server", "client_0", "client_1")
        for key, value in (("eval_accuracy", 0.5), ("eval_accuracy_norm", 0.5), ("eval_seconds", 0.1))
    }
    assert first["round"] == 1 and first["client_0/task_loss"] == 1.0
    assert first["server/teacher_counts/client_1"] == 1.0
    assert first["server/bytes_received"] > 0
    assert all(isinstance(v, float) or key == "round" for key, v in first.items())


@pytest.mark.parametrize(
    ("every_round", "final", "evaluated"), [(True, False, [1, 2, 3]), (False, True, [3]), (False, False, [])]
)
def test_evaluation_after_every_round_only_the_last_or_none(tmp_path, every_round, final, evaluated):
    calls: list = []
    parties = [FakeParty(name, calls) for name in ("server", "client_0", "client_1")]
    config = run_config(rounds=3)
    config.federation.evaluate_before = False
    config.federation.evaluate_every_round, config.federation.evaluate_final = every_round, final
    summary = FederatedTrainer(parties[0], parties[1:], config, tmp_path / "run").fit()
    scored = [r["round"] for r in summary["rounds"] if "eval_accuracy" in r["parties"]["client_0"]]
    assert scored == evaluated and summary["zero_shot"] == {}


def test_summary_json_is_standard_json_even_with_nan_losses(tmp_path):
    calls: list = []
    clients = [FakeParty("client_0", calls, task_loss=float("nan"))]  # e.g. local_epochs: 0
    trainer = FederatedTrainer(
        FakeParty("server", calls), clients, run_config(rounds=1, clients=1), tmp_path, loggers=[FakeLogger()]
    )
    trainer.run_round(1)
    on_disk = strict_json((tmp_path / "summary.json").read_text())
    assert on_disk["rounds"][0]["parties"]["client_0"]["task_loss"] is None
    assert math.isnan(trainer.summary["rounds"][0]["parties"]["client_0"]["task_loss"])  # in memory: untouched


def _corrupt_share(client):
    original = client.share_knowledge

    def share_nan(round_index):
        bad = original(round_index)
        bad.losses[0] = float("inf")
        return bad

    client.share_knowledge = share_nan


def test_a_bad_payload_is_rejected_and_its_sender_left_out_of_the_round(federation):
    _corrupt_share(federation.clients[1])
    with pytest.warns(UserWarning, match="client_1 failed"):
        record = federation.trainer.run_round(1)
    assert "rejected payload from client_1" in record["failed"]["client_1"]
    assert "NaN/inf" in record["parties"]["client_1"]["failed"]
    # The server distilled from the healthy client only; the failed one got no server knowledge.
    server_calls = [c for c in federation.calls if c[0] == "server" and c[1] == "distill"]
    assert server_calls == [("server", "distill", 1, ("client_0",))]
    assert not any(c[0] == "client_1" and c[1] == "distill" for c in federation.calls)
    assert strict_json((federation.run_dir / "summary.json").read_text())["rounds"][0]["failed"] == record["failed"]


def test_below_min_clients_the_round_fails_and_the_checkpoint_stays(federation):
    federation.trainer.run_round(1)
    checkpoint = (federation.run_dir / "checkpoint" / "checkpoint.json").read_text()
    federation.trainer.config.federation.min_clients = 2
    _corrupt_share(federation.clients[1])
    with pytest.raises(FedMKTError, match=r"only 1 of 2 clients answered .*--resume"):
        federation.trainer.run_round(2)
    assert (federation.run_dir / "checkpoint" / "checkpoint.json").read_text() == checkpoint
    assert [r["round"] for r in strict_json((federation.run_dir / "summary.json").read_text())["rounds"]] == [1]


# ---- summary writing and the results table -----------------------------------------------------


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "summary.json"
    atomic_write_text(target, '{"rounds": []}')
    assert strict_json(target.read_text()) == {"rounds": []}
    atomic_write_text(target, '{"rounds": [1]}')
    assert strict_json(target.read_text()) == {"rounds": [1]}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, '{"rounds": [1, 2]}')
    assert strict_json(target.read_text()) == {"rounds": [1]}  # the old content, intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_results_table_lists_accuracy_per_round_selection_and_traffic(federation):
    federation.trainer.fit()
    lines = federation.trainer.results_table().splitlines()
    assert lines[0] == "| party | zero-shot | round 1 | round 2 | selected (last) | MB sent (last) |"
    assert lines[1] == "|---|---|---|---|---|---|"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert list(rows) == ["server", "client_0", "client_1"]
    last = federation.trainer.summary["rounds"][-1]["parties"]
    for name, line in rows.items():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == ["0.500 (0.500)", "0.600 (0.500)", "0.700 (0.500)"]  # acc (acc_norm)
        assert cells[4] == str(last[name]["selected"])
        assert cells[5] == f"{last[name]['bytes_sent'] / 1e6:.2f}"


def test_results_table_without_zero_shot_or_rounds(tmp_path):
    calls: list = []
    trainer = FederatedTrainer(
        FakeParty("server", calls), [FakeParty("client_0", calls)], run_config(clients=1), tmp_path
    )
    lines = trainer.results_table().splitlines()
    assert lines[0] == "| party | selected (last) | MB sent (last) |"
    assert lines[2] == "| server | – | 0.00 |"


# ---- a real Participant ------------------------------------------------------------------------


def qa(n: int, tag: str) -> list[QAExample]:
    return [
        QAExample(f"{tag}{i}", f"Question: is {tag} number {i} {'big ' * (i % 3)}?\nAnswer:", (" yes", " no"), i % 2)
        for i in range(n)
    ]


def make_participant(name, tokenizer, make_tiny_llama, cache_dir, seed, transfer, unlabelled=False, gold=False):
    """A tiny participant on 3 public questions (without their answers with `unlabelled`; `gold` keeps
    them aside for the diagnostic)."""
    config = PartyConfig(
        model=ModelSpec("embedded:smollm2-135m-instruct"),
        lora=LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0),
        trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
        batch_size=2,
        eval_batch_size=3,
    )
    module = PartyModule(make_tiny_llama(len(tokenizer), seed=seed), config.lora, config.optimizer, transfer, name=name)
    public = [without_answer(e) for e in qa(3, "public")] if unlabelled else qa(3, "public")
    data = PartyDataModule(name, qa(2, f"{name}-private"), public, tokenizer, 48, 2, 3, seed)
    return Participant(
        name,
        config,
        transfer,
        module,
        tokenizer,
        data,
        qa(2, "eval"),
        {"peer": tokenizer},
        cache_dir,
        48,
        seed,
        public_gold=qa(3, "public") if gold else None,
    )


def test_participant_phases_share_distil_and_save(smollm2_tokenizer, make_tiny_llama, tmp_path):
    transfer = TransferConfig(top_k=3, selection="all")
    party = make_participant("client_0", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 0, transfer)
    peer = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 1, transfer)

    shared = party.share_knowledge(round_index=1)
    shared.validate(num_public=3)
    assert (shared.sender, shared.round, shared.vocab_size, shared.top_k) == ("client_0", 1, len(smollm2_tokenizer), 3)
    assert shared.topk_ids.dtype == torch.int32  # 49,152 ids do not fit int16
    assert sorted(shared.sample_index.tolist()) == [0, 1, 2]
    for row, index in enumerate(shared.sample_index.tolist()):  # the sender's own tokens, per public sample
        assert torch.equal(shared.sample(row)[0], party.data.public[index].input_ids)
    # public_losses is the same CE, ordered by sample index, reused while the weights are unchanged
    assert torch.equal(party.public_losses(), shared.losses[shared.sample_index.argsort()])

    stats = party.fine_tune(round_index=1)
    assert math.isfinite(stats.task_loss) and stats.kd_loss == 0.0 and stats.ranks == 1
    assert party._public_losses is None  # weights changed: own losses must be recomputed

    teacher = peer.share_knowledge(round_index=1)
    distilled = party.distill(1, {"peer": KnowledgePayload.from_bytes(teacher.to_bytes())})
    assert distilled.selected == 3 and distilled.teacher_counts == {"peer": 3}  # "all": every sample
    assert distilled.kd_loss > 0 and math.isfinite(distilled.task_loss)

    scores = party.evaluate()
    assert 0.0 <= scores["eval_accuracy"] <= 1.0
    party.save_adapter(tmp_path / "adapters" / "client_0")
    saved = sorted(p.name for p in (tmp_path / "adapters" / "client_0").iterdir())
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["client_0"]  # no temporary folder left


def test_the_length_sorted_public_pass_gives_the_payload_of_the_unsorted_one(
    smollm2_tokenizer, make_tiny_llama, tmp_path, monkeypatch
):
    party = make_participant("client_0", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 0, TransferConfig())
    sorted_payload = party.share_knowledge(round_index=1)
    lengths = [len(s.input_ids) for s in party.data.public]
    assert sorted(lengths, reverse=True) != lengths  # the sort really reorders this public set
    in_order = PartyDataModule.predict_dataloader

    def unsorted(self):  # the public set in sample order, as before the sort
        return _loader([s.as_item() for s in self.public], self.eval_batch_size, self.pad_id, False, self.seed)

    monkeypatch.setattr(PartyDataModule, "predict_dataloader", unsorted)
    plain = party.share_knowledge(round_index=1)
    monkeypatch.setattr(PartyDataModule, "predict_dataloader", in_order)
    assert sorted_payload.sample_index.tolist() == plain.sample_index.tolist() == [0, 1, 2]
    for name in ("offsets", "token_ids", "topk_ids"):
        assert torch.equal(getattr(sorted_payload, name), getattr(plain, name)), name
    for name in ("losses", "topk_logits", "logsumexp"):
        torch.testing.assert_close(getattr(sorted_payload, name), getattr(plain, name), rtol=1e-5, atol=1e-5)


def test_participant_distill_selects_aligns_builds_its_data_then_trains(
    smollm2_tokenizer, make_tiny_llama, tmp_path, monkeypatch
):
    import fedmkt.federation.participant as participant_module

    transfer = TransferConfig(top_k=3, selection="all")
    party = make_participant("client_0", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 0, transfer)
    peer = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 1, transfer)
    teacher = {"peer": KnowledgePayload.from_bytes(peer.share_knowledge(round_index=1).to_bytes())}
    events, seen = [], {}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            events.append(name)
            seen[name] = result
            return result

        return wrapped

    monkeypatch.setattr(participant_module, "dual_min_ce", spy("select", participant_module.dual_min_ce))
    monkeypatch.setattr(party.alignment, "align_selected", spy("align", party.alignment.align_selected))
    monkeypatch.setattr(participant_module, "DistillationDataModule", spy("data", DistillationDataModule))
    fit = party._fit

    def spy_fit(trainer, data, seed, phase):
        events.append("fit")
        assert phase == "distill"
        assert data is seen["data"]
        defaults = {type(c).__name__ for c in L.Trainer(logger=False, enable_progress_bar=False).callbacks}
        names = {type(c).__name__ for c in trainer.callbacks} - defaults
        assert {"SelectiveTransferCallback", "AlignmentCacheCallback"} <= names  # they report the phase
        assert names <= {
            "SelectiveTransferCallback",
            "AlignmentCacheCallback",
            "PhaseProgressBar",
            "PhaseDeadlineCallback",
        }
        seen["masks"] = [item["kd_mask"].clone() for item in data.items]
        seen["trainer"] = trainer
        return fit(trainer, data, seed, phase)

    monkeypatch.setattr(party, "_fit", spy_fit)
    stats = party.distill(1, teacher)

    assert events == ["select", "align", "data", "fit"]
    selection, targets, data = seen["select"], seen["align"], seen["data"]
    assert stats.selected == selection.num_selected == 3 and stats.teacher_counts == selection.counts()
    for item, ids in zip(data.items, (targets.ids[i] for i in range(3))):
        assert torch.equal(item["kd_ids"][:, : ids.shape[1]], ids[:, :3])
    assert all(torch.equal(item["kd_mask"], mask) for item, mask in zip(data.items, seen["masks"]))  # not mutated
    logged = {key: float(value) for key, value in seen["trainer"].callback_metrics.items()}
    assert (logged["selected"], logged["selected/peer"]) == (3, 3)
    assert (logged["alignment/misses"], logged["alignment/hits"], logged["alignment/samples"]) == (1, 0, 3)


def test_public_losses_score_the_public_set_without_building_a_noised_payload(
    smollm2_tokenizer, make_tiny_llama, tmp_path, monkeypatch
):
    import fedmkt.federation.participant as participant_module

    party = make_participant("client_0", smollm2_tokenizer, make_tiny_llama, tmp_path / "cache", 0, TransferConfig())
    shared = party.share_knowledge(round_index=1)
    party.restore_public_losses(None)

    def no_payload(*args, **kwargs):
        raise AssertionError("public_losses needs the CE only")

    monkeypatch.setattr(participant_module, "add_logit_noise", no_payload)
    monkeypatch.setattr(participant_module, "KnowledgePayload", no_payload)
    assert torch.equal(party.public_losses(), shared.losses[shared.sample_index.argsort()])


def test_an_interval_reaches_the_loggers_as_its_two_ends(federation):
    scores = {"eval_accuracy": 0.5, "eval_n": 12, "eval_accuracy_ci": [0.25, 0.75], "teacher_counts": {"client_0": 3}}
    federation.trainer._log({"server": scores}, step=1)
    logged = federation.logger.logged[-1][1]
    assert logged == {
        "server/eval_accuracy": 0.5,
        "server/eval_n": 12.0,
        "server/eval_accuracy_ci_low": 0.25,
        "server/eval_accuracy_ci_high": 0.75,
        "server/teacher_counts/client_0": 3.0,
        "round": 1,
    }


def test_results_table_shows_each_accuracy_with_its_interval_and_the_sample_size(federation):
    federation.trainer.summary["zero_shot"] = {
        name: {"eval_accuracy": 0.5, "eval_n": 12, "eval_accuracy_ci": [0.2537, 0.7463]}
        for name in ("server", "client_0", "client_1")
    }
    table = federation.trainer.results_table()
    assert "| server | 0.500 [0.25, 0.75] |" in table
    assert table.rstrip().endswith("accuracy [95 % Wilson CI] (acc_norm) on n = 12 held-out examples")


def test_results_table_gives_each_named_held_out_set_a_row_and_the_pooled_one(tmp_path):
    calls: list = []
    trainer = FederatedTrainer(
        FakeParty("server", calls), [FakeParty("client_0", calls)], run_config(clients=1), tmp_path
    )
    entry = {
        "eval_accuracy": 0.55, "eval_accuracy_norm": 0.6, "eval_n": 300, "eval_accuracy_ci": [0.49, 0.61],
        "eval_arc_easy_accuracy": 0.7, "eval_arc_easy_accuracy_norm": 0.65, "eval_arc_easy_n": 200,
        "eval_arc_easy_accuracy_ci": [0.63, 0.76],
        "eval_commonsense_qa_accuracy": 0.25, "eval_commonsense_qa_accuracy_norm": 0.5, "eval_commonsense_qa_n": 100,
        "eval_commonsense_qa_accuracy_ci": [0.17, 0.35],
    }  # fmt: skip
    trainer.summary["zero_shot"] = {"server": entry, "client_0": entry}
    lines = trainer.results_table().splitlines()
    assert lines[0] == "| party | held-out set | zero-shot | selected (last) | MB sent (last) |"
    assert lines[2:5] == [
        "| server | arc_easy | 0.700 [0.63, 0.76] (0.650) | – | 0.00 |",
        "| server | commonsense_qa | 0.250 [0.17, 0.35] (0.500) | – | 0.00 |",
        "| server | pooled | 0.550 [0.49, 0.61] (0.600) | – | 0.00 |",
    ]
    assert (
        lines[-1]
        == "accuracy [95 % Wilson CI] (acc_norm) on held-out examples: arc_easy 200; commonsense_qa 100; pooled 300"
    )


class PhaseRecorder(FakeParty):
    """A FakeParty that records every phase the trainer calls on it, evaluation and saving included."""

    def evaluate(self):
        self.calls.append((self.name, "evaluate"))
        return super().evaluate()

    def save_adapter(self, directory: Path):
        self.calls.append((self.name, "save_adapter"))
        return super().save_adapter(directory)


@pytest.mark.parametrize("mode", ["fedmkt", "llm2slm", "standalone"])
@pytest.mark.parametrize(("every", "final"), [(True, False), (False, True), (False, False)])
def test_the_round_plan_names_the_client_phases_the_trainer_runs_next(tmp_path, mode, every, final):
    """The Flower backend sends a client's follow-up phases in one message on the plan's word
    (`RoundPlan.client_follow_ups`); here the in-process trainer must run exactly those next."""
    calls: list = []
    config = run_config(rounds=2, clients=1)
    config.federation.mode = mode
    config.federation.evaluate_before = False
    config.federation.evaluate_every_round, config.federation.evaluate_final = every, final
    client = PhaseRecorder("client_0", calls, seed=200)
    trainer = FederatedTrainer(PhaseRecorder("server", calls, seed=100), [client], config, tmp_path / "run")
    trainer.fit()
    names = {"share": "share_knowledge"}
    sequence = [(entry[1], entry[2] if len(entry) > 2 else None) for entry in calls if entry[0] == "client_0"]
    phases = [names.get(phase, phase) for phase, _ in sequence]
    checked = 0
    for position, (phase, round_index) in enumerate(sequence):
        if phase in ("fine_tune", "distill"):
            follow = trainer.plan.client_follow_ups(phase, round_index)
            assert tuple(phases[position + 1 : position + 1 + len(follow)]) == follow, (phase, round_index, phases)
            checked += bool(follow)
    assert checked > 0 or mode == "standalone"
