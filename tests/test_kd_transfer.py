"""benchmarks/kd_transfer.py: the report's arithmetic and how its steps are keyed (the control: test_teacher_controls.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fedmkt.payload import KnowledgePayload

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kd_transfer.py"


@pytest.fixture(scope="module")
def kd_transfer():
    spec = importlib.util.spec_from_file_location("kd_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kd_transfer"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def payload(temperature: float = 2.0) -> KnowledgePayload:
    g = torch.Generator().manual_seed(0)
    rows, k = 5, 4
    logits = (torch.randn(rows, k, generator=g) * 3).sort(dim=1, descending=True).values
    return KnowledgePayload(
        sender="server",
        round=1,
        vocab_size=50,
        sample_index=torch.arange(1),
        losses=torch.ones(1),
        offsets=torch.tensor([0, rows]),
        token_ids=torch.arange(rows).to(torch.int16),
        topk_ids=torch.randint(50, (rows, k), generator=g).to(torch.int16),
        topk_logits=logits.half(),
        logsumexp=torch.logsumexp(logits / temperature, dim=1) + 0.7,  # 1 - e^-0.7 of the mass is outside
        label_logprob=-torch.arange(1.0, rows + 1),
        temperature=temperature,
    )


def test_report_gap_closed_and_difference_to_the_control(kd_transfer, tmp_path):
    bench = kd_transfer.Bench("quick", kd_transfer.base_config("quick", []), tmp_path)

    def result(correct: str) -> dict:
        n = len(correct)
        return {
            "eval_accuracy": correct.count("1") / n,
            "eval_accuracy_ci": [0.0, 1.0],
            "eval_n": n,
            "eval_correct": correct,
            "seconds": 1.0,
        }

    student = result("1111100000") | {"kd_loss": 1.5, "alignment": {"matched": 1.0}}
    results = {
        "same_tokenizer": {
            "teacher": result("1111111000"),  # 70 %
            "zero_shot": result("1110000000"),  # 30 %
            "kd": student,  # 50 %: half the gap
            "control": result("1110000001"),  # 40 %
        }
    }
    pair = kd_transfer.report(bench, [], results)["pairs"]["same_tokenizer"]
    assert pair["gap_closed"] == pytest.approx(0.5)
    assert pair["control_gap_closed"] == pytest.approx(0.25)
    assert pair["diff_vs_control"]["diff"] == pytest.approx(0.1)
    assert pair["teacher_acc"] == 0.7 and pair["student_acc"] == 0.5 and pair["control_acc"] == 0.4
    assert set(pair) >= {"teacher", "student", "student_zero_shot_acc", "ci", "diff_vs_control"}


def test_overrides_need_a_try_name(kd_transfer):
    with pytest.raises(SystemExit):
        kd_transfer.main(["--override", "transfer.topk_target=tail"])


def test_a_student_step_is_keyed_by_the_teacher_payloads_bytes(kd_transfer, tmp_path, monkeypatch):
    """A teacher payload made again (other bytes, same file name) must not reuse a student's stored result,
    and a stored payload this version cannot read sends the teacher step back to work."""
    bench = kd_transfer.Bench("quick", kd_transfer.base_config("quick", []), tmp_path)
    names = []

    def cached(bench, name, compute):
        names.append(name)
        return {}

    monkeypatch.setattr(kd_transfer, "cached", cached)
    path = tmp_path / "teacher.payload"
    for temperature in (1.0, 2.0):
        path.write_bytes(payload(temperature).to_bytes())
        kd_transfer.student_step(bench, "same_tokenizer", False, path, data=None)
    assert names[0] != names[1]

    teacher = kd_transfer.pair_config(bench, kd_transfer.SMOLLM2, kd_transfer.SMOLLM2)
    transfer = teacher.transfer
    name = bench.key("teacher", "smollm2-135m-instruct", teacher.server, transfer.top_k, transfer.temperature)
    stored = tmp_path / f"{name}.json"
    stored.write_text("{}")
    (tmp_path / f"{name}.payload").write_bytes(b"written by an older version")
    kd_transfer.teacher_step(bench, kd_transfer.SMOLLM2, data=None)
    assert not stored.exists()  # its result went with the payload it could not read


def test_an_unlabelled_report_compares_the_student_with_both_control_teachers(kd_transfer, tmp_path):
    config = kd_transfer.base_config("quick", ["data.public_labels=false"])
    bench = kd_transfer.Bench("quick", config, tmp_path)

    def result(correct: str) -> dict:
        n = len(correct)
        return {"eval_accuracy": correct.count("1") / n, "eval_accuracy_ci": [0.0, 1.0], "eval_correct": correct}

    hard, random = result("1110000000") | {"seconds": 2.0}, result("1000000000") | {"seconds": 3.0}
    got = {
        "teacher": result("1111111000") | {"seconds": 1.0, "public_answer_accuracy": 0.75},
        "zero_shot": result("1100000000") | {"seconds": 1.0},
        "kd": result("1111100000") | {"seconds": 1.0, "kd_loss": 1.0, "alignment": {}},
        "hard": hard,
        "random": random,
        "control": hard,
    }
    report = kd_transfer.report(bench, [], {"same_tokenizer": got})
    pair = report["pairs"]["same_tokenizer"]
    assert report["public_labels"] is False
    assert pair["hard_control_acc"] == pair["control_acc"] == 0.3 and pair["random_control_acc"] == 0.1
    assert pair["diff_vs_hard"]["diff"] == pytest.approx(0.2) and pair["diff_vs_random"]["diff"] == pytest.approx(0.4)
    assert pair["teacher_public_answer_accuracy"] == 0.75
    assert pair["seconds"] == {"teacher": 1.0, "zero_shot": 1.0, "kd": 1.0, "hard": 2.0, "random": 3.0, "control": 2.0}
