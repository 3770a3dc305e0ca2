"""The domains preset (`data.client_tasks`) and named held-out sets (`data.eval_sets`).

Each client's private part comes from its own task, the public part from all of them, and every
party is scored on each task's held-out set and on all of them pooled.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedmkt.cli import main
from fedmkt.config import parse_run_config, validate
from fedmkt.data.examples import QAExample, content_key
from fedmkt.data.parts import federation_data
from fedmkt.data.tasks import load_task, split_domains
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import pool_scores, wilson_interval

NAMES = ["server", "client_0", "client_1"]


def _questions(prefix: str, count: int) -> list[QAExample]:
    return [QAExample(f"{prefix}-{i}", f"{prefix} question {i}?", (" a", " b"), i % 2) for i in range(count)]


def test_each_task_gives_one_client_its_share_of_the_public_set_and_its_own_held_out_set():
    tasks = {"science": _questions("science", 40), "common": _questions("common", 30)}
    split = split_domains(tasks, eval_size=10, pool_size=16, seed=3, public_size=9)
    assert [len(part) for part in split.private] == [16 - 5, 16 - 4]  # the first task takes the remainder
    assert all(e.uid.startswith("science") for e in split.private[0])
    assert all(e.uid.startswith("common") for e in split.private[1])
    assert sorted(e.uid.split("-")[0] for e in split.public) == ["common"] * 4 + ["science"] * 5
    assert {name: len(held) for name, held in split.evaluation_sets.items()} == {"science": 10, "common": 10}
    assert all(e.uid.startswith(name) for name, held in split.evaluation_sets.items() for e in held)
    assert split.evaluation == split.evaluation_sets["science"] + split.evaluation_sets["common"]
    parts = [split.public, *split.private, *split.evaluation_sets.values()]
    uids = [e.uid for part in parts for e in part]
    assert len(uids) == len(set(uids))  # no question in two parts
    assert [e.uid.split("-")[0] for e in split.public] != sorted(e.uid.split("-")[0] for e in split.public)  # mixed


def test_a_task_keeps_its_held_out_questions_when_its_pool_changes_until_the_pool_reaches_them():
    tasks = {"science": _questions("science", 40), "common": _questions("common", 30)}
    small = split_domains(tasks, eval_size=10, pool_size=8, seed=3)
    large = split_domains(tasks, eval_size=10, pool_size=20, seed=3)
    assert small.evaluation_sets == large.evaluation_sets
    capped = split_domains(tasks, eval_size=20, pool_size=16, seed=3)
    assert len(capped.evaluation_sets["science"]) == 20 and len(capped.evaluation_sets["common"]) == 30 - 16
    assert set(large.evaluation_sets["common"]) < set(capped.evaluation_sets["common"])  # the rest of its shuffle
    assert len(small.public) == 4 + 4  # without public_size: half of each task's pool


def test_domains_yaml_gives_each_client_its_own_task_and_scores_every_party_on_both():
    config = parse_run_config(["--config", "domains"])
    validate(config)
    data = federation_data(config, NAMES)
    arc = {content_key(e) for e in load_task("arc_easy")}
    csqa = {content_key(e) for e in load_task("commonsense_qa")}
    assert {content_key(e) in arc for e in data["client_0"].private} == {True}
    assert {content_key(e) in csqa for e in data["client_1"].private} == {True}
    public = [content_key(e) for e in data["server"].public]
    assert sum(key in arc for key in public) == sum(key in csqa for key in public) == config.data.public_size // 2
    for name in NAMES:
        sets = data[name].evaluation_sets
        assert {task: len(held) for task, held in sets.items()} == {"arc_easy": 120, "commonsense_qa": 120}
        assert {content_key(e) in arc for e in sets["arc_easy"]} == {True}
        assert {content_key(e) in csqa for e in sets["commonsense_qa"]} == {True}
        assert data[name].evaluation == sets["arc_easy"] + sets["commonsense_qa"]


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["--data.client_tasks", "[arc_easy]"], r"names 1 task\(s\) for 2 client\(s\)"),
        (["--data.client_tasks", "[arc_easy, arc_easy]"], "repeats a task"),
        (["--data.task", "arc_easy"], "data.task and data.client_tasks are both set"),
        (["--data.eval", "{path: x.jsonl}", "--data.eval_sets", "{a: {path: y.jsonl}}"], "both set"),
    ],
)
def test_a_domains_config_that_cannot_work_is_one_line_naming_the_fix(overrides, problem):
    config = parse_run_config(["--config", "domains", *overrides])
    with pytest.raises(FedMKTError, match=problem) as caught:
        validate(config)
    assert "Fix:" in str(caught.value) and "\n" not in str(caught.value)


def test_a_client_task_of_another_format_or_an_unknown_one_is_refused_before_any_model_loads():
    for tasks, problem in (
        ("[arc_easy, nq_open]", "mixes multiple-choice and generation"),
        ("[arc_easy, nope]", "unknown task 'nope'"),
    ):
        config = parse_run_config(["--config", "domains", "--data.client_tasks", tasks])
        with pytest.raises(FedMKTError, match=problem):
            federation_data(config, NAMES)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_named_held_out_sets_from_files_are_scored_apart_and_must_not_share_a_question(tmp_path):
    own = Path(__file__).parents[1] / "lightning_configs" / "own_data"
    rows = [json.loads(line) for line in (own / "eval.jsonl").read_text().splitlines()]
    first, second = _jsonl(tmp_path / "first.jsonl", rows[:3]), _jsonl(tmp_path / "second.jsonl", rows[3:])
    text = (Path(__file__).parents[1] / "lightning_configs" / "own_data.yaml").read_text()
    for name in ("public", "client_0", "client_1", "eval"):
        text = text.replace(f"own_data/{name}.jsonl", str(own / f"{name}.jsonl"))
    yaml_path = tmp_path / "own.yaml"
    yaml_path.write_text(text)
    sets = json.dumps({"first": {"path": str(first)}, "second": {"path": str(second)}})
    config = parse_run_config(["--config", str(yaml_path), "--data.eval", "null", "--data.eval_sets", sets])
    validate(config)
    data = federation_data(config, NAMES)
    assert [len(held) for held in data["client_0"].evaluation_sets.values()] == [3, len(rows) - 3]
    assert [e.prompt for e in data["client_0"].evaluation] == [row["prompt"] for row in rows]
    _jsonl(second, rows[2:])  # the first set's last question in the second too
    config = parse_run_config(["--config", str(yaml_path), "--data.eval", "null", "--data.eval_sets", sets])
    with pytest.raises(FedMKTError, match="data.eval_sets.second"):
        federation_data(config, NAMES)


def test_pooled_scores_weigh_each_set_by_its_size_and_count_the_pooled_hits():
    # Worked by hand: 3 of 4 right (acc_norm 0.5) and 1 of 2 right (acc_norm 1.0) -> 4 of 6.
    pooled = pool_scores(
        [
            {"acc": 0.75, "acc_norm": 0.5, "n": 4, "acc_ci": [0, 1], "correct": "1101"},
            {"acc": 0.5, "acc_norm": 1.0, "n": 2, "acc_ci": [0, 1], "correct": "01"},
        ]
    )
    assert pooled["acc"] == pytest.approx(4 / 6) and pooled["acc_norm"] == pytest.approx(4 / 6)
    assert pooled["n"] == 6 and pooled["correct"] == "110101"
    assert pooled["acc_ci"] == pytest.approx(list(wilson_interval(4, 6)))
    generation = pool_scores(
        [{"rouge_l": 0.2, "exact_match": 0.0, "n": 1}, {"rouge_l": 0.5, "exact_match": 1.0, "n": 3}]
    )
    assert generation == pytest.approx({"rouge_l": 1.7 / 4, "exact_match": 0.75, "n": 4})


TINY_DOMAINS = [
    "--data.task", "null", "--data.client_tasks", "[arc_easy, commonsense_qa]",
    "--data.eval_size", "6", "--data.pool_size", "12", "--data.public_size", "8",
    "--federation.rounds", "1", "--logging.wandb", "false",
]  # fmt: skip


def test_a_tiny_domains_run_reports_every_task_with_its_n_and_interval_and_pools_them(tmp_path, capsys):
    run_dir = tmp_path / "domains"
    assert main(["fit", "--config", "tiny", "--run_dir", str(run_dir), *TINY_DOMAINS]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for entry in [*summary["zero_shot"].values(), *summary["rounds"][-1]["parties"].values()]:
        parts = [
            (entry[f"eval_{task}_accuracy"], entry[f"eval_{task}_n"], entry[f"eval_{task}_correct"])
            for task in ("arc_easy", "commonsense_qa")
        ]
        assert [n for _, n, _ in parts] == [6, 6] and entry["eval_n"] == 12
        assert entry["eval_correct"] == parts[0][2] + parts[1][2]
        assert entry["eval_accuracy"] == pytest.approx(sum(acc * n for acc, n, _ in parts) / 12)
        for task in ("arc_easy", "commonsense_qa"):
            hits = entry[f"eval_{task}_correct"].count("1")
            assert entry[f"eval_{task}_accuracy_ci"] == pytest.approx(list(wilson_interval(hits, 6)))
            assert 0.0 <= entry[f"eval_{task}_accuracy_norm"] <= 1.0
    with open(run_dir / "logs" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    for task in ("arc_easy", "commonsense_qa"):
        for key in ("accuracy", "accuracy_norm", "n", "accuracy_ci_low", "accuracy_ci_high"):
            assert f"client_1/eval_{task}_{key}" in columns
    printed = capsys.readouterr().out
    assert "| client_0 | commonsense_qa |" in printed and "| server | pooled |" in printed
