"""`fedmkt evaluate --model`: a model and an evaluation source are all it reads, and it scores as the run did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmkt.cli import main
from fedmkt.config import run_config_from_text
from fedmkt.data.parts import SourceReader

FAST = ["--config", "tiny", "--federation.rounds", "1", "--federation.evaluate_before", "false"]
FAST += ["--logging.wandb", "false", "--data.pool_size", "9", "--data.max_length", "48"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("scoring") / "run"
    assert main(["fit", *FAST, "--run_dir", str(run_dir)]) == 0
    return run_dir


def _recorded(run_dir: Path, party: str) -> dict:
    """The party's scores as the run recorded them after its last round (the oracle)."""
    return json.loads((run_dir / "summary.json").read_text())["rounds"][-1]["parties"][party]


def _scores(line: str) -> dict:
    return dict(item.split("=", 1) for item in line.split())


def _held_out_as_jsonl(run_dir: Path, path: Path) -> Path:
    """The run's held-out questions as a plain JSONL file (another way in to the same questions)."""
    examples = SourceReader(run_config_from_text((run_dir / "config.yaml").read_text())).evaluation()
    rows = [{"id": e.uid, "prompt": e.prompt, "choices": list(e.choices), "answer": e.answer_index} for e in examples]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_run_party_on_its_task_scores_what_the_run_recorded(trained, tmp_path, capsys):
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--model", str(trained), "--party", "client_0", "--eval", "arc_easy", "--out", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    recorded = _recorded(trained, "client_0")
    scores = _scores(line)
    assert set(scores) == {"acc", "acc_norm", "n", "acc_ci"}
    assert float(scores["acc"]) == pytest.approx(recorded["eval_accuracy"], abs=1e-4)
    report = json.loads(out.read_text())
    assert report["party"] == "client_0" and report["round"] == 1 and report["n"] == len(recorded["eval_correct"])
    assert "".join("1" if q["correct"] else "0" for q in report["questions"]) == recorded["eval_correct"]
    assert len({q["id"] for q in report["questions"]}) == report["n"]


@pytest.mark.parametrize("merge", [True, False])
def test_an_exported_folder_on_a_jsonl_source_scores_the_same_questions_the_same(trained, tmp_path, capsys, merge):
    export = tmp_path / "export"
    assert (
        main(["export", "--run", str(trained), "--party", "client_1", "--out", str(export), *(["--merge"] * merge)])
        == 0
    )
    questions = _held_out_as_jsonl(trained, tmp_path / "held_out.jsonl")
    out = tmp_path / "scores.json"
    argv = [
        "evaluate",
        "--model",
        str(export),
        "--eval",
        f"{{path: {questions}}}",
        "--max_length",
        "48",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (
        "".join("1" if q["correct"] else "0" for q in report["questions"])
        == _recorded(trained, "client_1")["eval_correct"]
    )


def test_a_model_folder_with_an_adapter_scores_as_the_run(trained, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", "--run", str(trained), "--party", "server", "--out", str(export)]) == 0  # writes base/
    adapter = trained / "adapters" / "round_1" / "server"
    questions = _held_out_as_jsonl(trained, tmp_path / "held_out.jsonl")
    argv = ["evaluate", "--model", str(export / "base"), "--adapter", str(adapter), "--eval", str(questions)]
    assert main([*argv, "--max_length", "48"]) == 0
    assert float(_scores(capsys.readouterr().out.strip().splitlines()[-1])["acc"]) == pytest.approx(
        _recorded(trained, "server")["eval_accuracy"], abs=1e-4
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "--eval SOURCE"),
        (["--eval", "arc_easy", "--party", "server"], "not a run folder"),
        (["--eval", "{pth: x.jsonl}"], "pth"),
        (["--eval", "arc_easy", "--config", "tiny"], "drop --config"),
    ],
)
def test_bad_model_scoring_input_is_one_line(tmp_path, capsys, extra, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    assert main(["evaluate", "--model", str(folder), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0] and "Fix:" in err[0], err


def test_the_config_form_refuses_options_of_the_model_form(capsys):
    assert main(["evaluate", "--config", "tiny", "--eval", "arc_easy"]) == 2
    assert "--eval goes with --model" in capsys.readouterr().err


def test_a_task_name_outside_a_run_is_the_held_out_part_the_preset_carves():
    from fedmkt.config import parse_run_config
    from fedmkt.model_scoring import evaluation_examples, evaluation_set

    name, examples = evaluation_examples(evaluation_set("arc_easy"), None, seed=7, eval_size=10)
    preset = parse_run_config(["--config", "tiny", "--seed", "7", "--data.eval_size", "10", "--data.pool_size", "9"])
    assert name == "arc_easy"
    assert [e.uid for e in examples] == [e.uid for e in SourceReader(preset).evaluation()]  # whatever the client count
