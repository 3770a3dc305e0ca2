"""How often each recorded BoolQ run answers "yes", split by the right answer.

BoolQ's held-out questions are 63 % "yes", so a model that always says yes scores 63 %. This reads
the per-question records of `reproduce.py`'s finished BoolQ runs and the questions' labels and
prints, per mode and party, the share of yes-questions and of no-questions answered "yes": a model
that tells the answers apart says yes far more often to the first than to the second.

    python benchmarks/answer_bias.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import yaml

from fedmkt.config import run_config_from_text
from fedmkt.data.parts import SourceReader

YES = 1
"""BoolQ's choices are (" no", " yes"): the label index of "yes"."""


def yes_rates(correct: str, labels: list[int]) -> tuple[float, float]:
    """Share of yes-questions and of no-questions answered "yes", from a two-choice run's record.

    `correct` holds "1" where the run chose the right answer: on a yes/no question that is "yes"
    exactly when the question's answer is yes.
    """
    if len(correct) != len(labels):
        raise ValueError(f"{len(correct)} answers recorded for {len(labels)} questions: the record is of another run")
    said_yes = [(bit == "1") == (label == YES) for bit, label in zip(correct, labels)]
    on_yes = [s for s, label in zip(said_yes, labels) if label == YES]
    on_no = [s for s, label in zip(said_yes, labels) if label != YES]
    return sum(on_yes) / max(len(on_yes), 1), sum(on_no) / max(len(on_no), 1)


def final_records(summary: dict) -> dict[str, str]:
    """Each party's per-question record after the run's last round (or of the zero-shot models)."""
    parties = summary["zero_shot"] if summary.get("zero_shot") else summary["rounds"][-1]["parties"]
    return {party: entry["eval_correct"] for party, entry in parties.items() if entry.get("eval_correct")}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/reproduction/runs"))
    args = parser.parse_args(argv)
    paths = sorted(args.runs.glob("boolq-*.json"))
    if not paths:
        print(f"answer_bias: no BoolQ runs in {args.runs}. Fix: run benchmarks/reproduce.py --tasks boolq first.")
        return 2
    print("| run | party | accuracy | yes on yes-questions | yes on no-questions |")
    print("|---|---|---|---|---|")
    for path in paths:
        summary = json.loads(path.read_text())
        config = run_config_from_text(yaml.safe_dump(summary["config"]))
        labels = [example.answer_index for example in SourceReader(config).evaluation()]
        for party, correct in final_records(summary).items():
            on_yes, on_no = yes_rates(correct, labels)
            accuracy = correct.count("1") / len(correct)
            print(f"| {path.stem} | {party} | {accuracy:.1%} (n = {len(correct)}) | {on_yes:.0%} | {on_no:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
