"""Public sets without labels (`data.public_labels: false`): no gold answer reaches a batch or a payload.

The strong test: the same run on a labelled public file read with `public_labels: false` and on a copy
of that file with the answer column removed sends byte-identical payloads and ends with the same
selections and metrics; only the first can (and does) report `public_answer_accuracy`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedmkt.cli import main
from fedmkt.federation.trainer import FederatedTrainer

DATA = Path(__file__).parents[1] / "lightning_configs" / "own_data"
FAST = ["--federation.rounds", "1", "--logging.wandb", "false", "--federation.evaluate_before", "false"]
TIMING = {"train_seconds", "eval_seconds", "timeline", "wall_seconds", "public_answer_accuracy"}


def _own_data(tmp_path: Path, public: Path, *extra: str, **files: Path) -> list[str]:
    """`fit` on own_data.yaml with its files found from anywhere, `public` as the public set and any of
    `client_0`, `client_1`, `eval` replaced by the files given."""
    text = (Path(__file__).parents[1] / "lightning_configs" / "own_data.yaml").read_text()
    for name in ("public", "client_0", "client_1", "eval"):
        path = public if name == "public" else files.get(name, DATA / f"{name}.jsonl")
        text = text.replace(f"own_data/{name}.jsonl", str(path))
    config = tmp_path / f"own_data_{len(list(tmp_path.glob('own_data_*.yaml')))}.yaml"
    config.write_text(text)
    return ["fit", "--config", str(config), *FAST, *extra]


def _without_answers(tmp_path: Path) -> Path:
    stripped = tmp_path / "public_questions.jsonl"
    rows = [json.loads(line) for line in (DATA / "public.jsonl").read_text().splitlines()]
    stripped.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "answer"}) + "\n" for row in rows))
    return stripped


@pytest.fixture
def sent(monkeypatch):
    """Every payload the trainer sends, as bytes, in order."""
    log: list[bytes] = []
    original = FederatedTrainer._send

    def recording(self, payload, receivers):
        log.append(payload.to_bytes())
        return original(self, payload, receivers)

    monkeypatch.setattr(FederatedTrainer, "_send", recording)
    return log


def _same_payloads(first: list[bytes], second: list[bytes]) -> bool:
    """Every field and metadata value equal, bit for bit (safetensors' header order is not fixed)."""
    from fedmkt.payload import _TENSOR_FIELDS, KnowledgePayload

    if len(first) != len(second):
        return False
    for a, b in zip(map(KnowledgePayload.from_bytes, first), map(KnowledgePayload.from_bytes, second)):
        if (a.sender, a.round, a.vocab_size, a.temperature) != (b.sender, b.round, b.vocab_size, b.temperature):
            return False
        for name in _TENSOR_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                return False
    return True


def _comparable(record: dict) -> dict:
    """A round's record without its wall times (and the diagnostic only a labelled source can give)."""
    kept = {}
    for name, party in record["parties"].items():
        kept[name] = {k: v for k, v in party.items() if k not in TIMING}
        kept[name]["callbacks"] = {k: v for k, v in party.get("callbacks", {}).items() if not k.endswith("seconds")}
    return kept


def test_a_hidden_answer_column_and_a_missing_one_give_the_same_run(tmp_path, sent):
    labelled_run, stripped_run = tmp_path / "hidden", tmp_path / "missing"
    argv = _own_data(tmp_path, DATA / "public.jsonl", "--data.public_labels", "false", "--run_dir", str(labelled_run))
    assert main(argv) == 0
    hidden = list(sent)
    sent.clear()
    assert main(_own_data(tmp_path, _without_answers(tmp_path), "--run_dir", str(stripped_run))) == 0
    assert len(hidden) == 3 and _same_payloads(sent, hidden)  # two clients' payloads and the server's, bit for bit
    first = json.loads((labelled_run / "summary.json").read_text())["rounds"][0]
    second = json.loads((stripped_run / "summary.json").read_text())["rounds"][0]
    assert _comparable(first) == _comparable(second)
    assert first["parties"]["server"]["selected"] > 0  # DualMinCE found the clients better somewhere
    for name, party in first["parties"].items():
        assert 0.0 <= party["public_answer_accuracy"] <= 1.0  # the diagnostic, where the source has answers
        assert "public_answer_accuracy" not in second["parties"][name]
    with open(labelled_run / "logs" / "metrics.csv") as file:
        assert "client_0/public_answer_accuracy" in next(csv.DictReader(file))


def test_the_diagnostic_counts_the_partys_own_answers_against_the_gold(tmp_path, sent):
    """public_answer_accuracy is the share of public questions whose shared answer is the gold option."""
    from fedmkt.payload import KnowledgePayload

    run = tmp_path / "run"
    extra = ["--data.public_labels", "false", "--transfer.selection", "all", "--run_dir", str(run)]
    assert main(_own_data(tmp_path, DATA / "public.jsonl", *extra)) == 0
    rows = [json.loads(line) for line in (DATA / "public.jsonl").read_text().splitlines()]
    gold = [" " + row["choices"][row["answer"]] for row in rows]
    record = json.loads((run / "summary.json").read_text())["rounds"][0]["parties"]
    for name, party in record.items():  # both sides distilled, on their teacher's answers
        assert party["selected"] > 0 and party["kd_loss"] > 0, name
    for data in sent:
        payload = KnowledgePayload.from_bytes(data)
        answers = [payload.answer_text(row) for row in range(len(payload))]
        expected = sum(a == gold[i] for a, i in zip(answers, payload.sample_index.tolist())) / len(rows)
        assert record[payload.sender]["public_answer_accuracy"] == pytest.approx(expected)
        for answer, index in zip(answers, payload.sample_index.tolist()):  # each its own option of that question
            assert answer in [" " + c for c in rows[index]["choices"]]


def test_tiny_runs_unlabelled_with_both_sides_distilling(tmp_path):
    run = tmp_path / "tiny"
    argv = ["fit", "--config", "tiny", *FAST, "--data.public_labels", "false", "--run_dir", str(run)]
    argv += ["--data.pool_size", "24", "--transfer.selection", "all"]  # random-init models: every sample, both ways
    assert main(argv) == 0
    record = json.loads((run / "summary.json").read_text())["rounds"][0]["parties"]
    for name, party in record.items():
        assert party["selected"] > 0 and party["kd_loss"] > 0, name
        assert 0.0 <= party["public_answer_accuracy"] <= 1.0


def test_labels_asked_of_a_source_without_them_are_one_line(tmp_path, capsys):
    argv = _own_data(tmp_path, _without_answers(tmp_path), "--data.public_labels", "true", "--run_dir", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.public_labels is true" in err and "no answer column" in err and "Fix:" in err


def test_private_and_evaluation_sets_still_need_their_answers(tmp_path, capsys):
    stripped = _without_answers(tmp_path)
    argv = _own_data(tmp_path, DATA / "public.jsonl", "--run_dir", str(tmp_path), client_0=stripped)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "clients[0].data" in err and "'answer'" in err and "Fix:" in err
    argv = _own_data(tmp_path, DATA / "public.jsonl", "--run_dir", str(tmp_path), eval=stripped)
    assert main(argv) == 2
    assert "data.eval" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_random_teacher_needs_an_unlabelled_public_set(tmp_path, capsys):
    argv = _own_data(tmp_path, DATA / "public.jsonl", "--transfer.teacher", "random", "--run_dir", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "transfer.teacher: random" in err and "data.public_labels: false" in err


@pytest.mark.parametrize("control", ["random", "hard"])
def test_control_teachers_share_flat_top_k_along_an_option(tmp_path, sent, control):
    from fedmkt.payload import KnowledgePayload

    run = tmp_path / control
    extra = ["--data.public_labels", "false", "--transfer.teacher", control, "--run_dir", str(run)]
    assert main(_own_data(tmp_path, DATA / "public.jsonl", *extra)) == 0
    rows = [json.loads(line) for line in (DATA / "public.jsonl").read_text().splitlines()]
    for data in sent:
        payload = KnowledgePayload.from_bytes(data)
        values = payload.topk_logits.float()
        assert bool((values == values[:, :1]).all())  # no ranking left
        for row, index in enumerate(payload.sample_index.tolist()):
            assert payload.answer_text(row) in [" " + c for c in rows[index]["choices"]]


class Killed(BaseException):
    """Stands in for a SIGKILL: not an Exception, so nothing in the run may swallow it."""


@pytest.mark.slow
def test_an_unlabelled_run_killed_in_round_2_resumes_to_the_same_summary(tmp_path, monkeypatch):
    """The answers a party shares are made again from the restored adapter, so a resumed run ends as
    an uninterrupted one does."""
    from fedmkt.federation.participant import Participant

    argv = ["fit", "--config", "tiny", "--logging.wandb", "false", "--federation.evaluate_before", "false"]
    argv += ["--data.public_labels", "false", "--data.pool_size", "24"]
    assert main([*argv, "--run_dir", str(tmp_path / "whole")]) == 0
    original = Participant.distill

    def distill_then_die(self, round_index, payloads):
        if round_index == 2 and self.name == "server":
            raise Killed()
        return original(self, round_index, payloads)

    monkeypatch.setattr(Participant, "distill", distill_then_die)
    with pytest.raises(Killed):
        main([*argv, "--run_dir", str(tmp_path / "killed")])
    monkeypatch.setattr(Participant, "distill", original)
    assert main([*argv, "--resume", str(tmp_path / "killed")]) == 0
    whole, resumed = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "killed"))
    assert [_comparable(r) for r in resumed["rounds"]] == [_comparable(r) for r in whole["rounds"]]
