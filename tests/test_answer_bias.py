"""benchmarks/answer_bias.py: yes-rates recovered from a two-choice run's right/wrong record."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "answer_bias.py"


@pytest.fixture(scope="module")
def answer_bias():
    spec = importlib.util.spec_from_file_location("answer_bias", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yes_rates_from_the_answers_a_model_gave(answer_bias):
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]  # 5 yes-questions, 5 no-questions
    said = [1, 1, 1, 0, 1, 1, 0, 0, 0, 1]  # what the model answered: 4/5 yes on yes, 2/5 yes on no
    correct = "".join("1" if s == label else "0" for s, label in zip(said, labels))
    assert answer_bias.yes_rates(correct, labels) == pytest.approx((0.8, 0.4))
    assert answer_bias.yes_rates("1" * 10, labels) == pytest.approx((1.0, 0.0))  # always right


def test_a_record_of_other_questions_is_refused(answer_bias):
    with pytest.raises(ValueError, match="another run"):
        answer_bias.yes_rates("101", [1, 0])
