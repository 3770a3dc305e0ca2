"""End to end on tiny models: federating JSONL files (own_data.yaml), a client's own eval set,
private-data isolation per participant, a generation task, and data errors before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedmkt.data.parts as parts_module
import fedmkt.federation.parties as run_module
from fedmkt.cli import main
from fedmkt.config import run_config_from_text, shipped_configs
from fedmkt.data.datamodule import tokenize_examples
from fedmkt.data.sources import load_source

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "lightning_configs" / "own_data"
FAST = ["--logging.wandb", "false", "--logging.csv", "false"]


def own_data_text(extra_client_0: str = "") -> str:
    """own_data.yaml with absolute data paths (tests may run from any folder)."""
    text = shipped_configs()["own_data.yaml"].read_text().replace("path: own_data/", f"path: {FILES}/")
    if extra_client_0:
        marker = f"      path: {FILES}/client_0.jsonl"
        line_end = text.index("\n", text.index(marker))
        text = text[: line_end + 1] + extra_client_0 + text[line_end + 1 :]
    return text


@pytest.fixture(scope="module")
def own_eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own") / "client_0_eval.jsonl"
    rows = [
        {"prompt": f"Question: What is {a} + 100?\nAnswer:", "choices": [str(a + 100), str(a + 101)], "answer": 0}
        for a in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory, own_eval_file) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("own_data")
    config = folder / "own_data.yaml"
    config.write_text(own_data_text(f"    eval:\n      path: {own_eval_file}\n"))
    run_dir = folder / "run"
    assert main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--federation.rounds", "1", *FAST]) == 0
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def test_own_data_yaml_scores_every_party_on_the_eval_file(own_data_run):
    summary, _ = own_data_run
    eval_rows = len((FILES / "eval.jsonl").read_text().splitlines())
    for scores in [*summary["zero_shot"].values(), *summary["rounds"][0]["parties"].values()]:
        assert scores["eval_n"] == eval_rows == 10
        low, high = scores["eval_accuracy_ci"]
        assert low <= scores["eval_accuracy"] <= high


def test_a_client_own_eval_set_is_scored_for_that_client_only(own_data_run):
    summary, _ = own_data_run
    client_0 = summary["rounds"][0]["parties"]["client_0"]
    assert client_0["own_eval_n"] == 5
    low, high = client_0["own_eval_accuracy_ci"]
    assert low <= client_0["own_eval_accuracy"] <= high
    for party in ("server", "client_1"):
        assert "own_eval_n" not in summary["rounds"][0]["parties"][party]


def test_each_participant_holds_only_its_own_private_examples(monkeypatch):
    config = run_config_from_text(own_data_text())
    server, clients = run_module.build_participants(config)
    files = {
        name: load_source(config.clients[i].data, f"clients[{i}].data")
        for i, name in enumerate(["client_0", "client_1"])
    }
    for client in clients:
        own = {
            tuple(s.input_ids.tolist())
            for s in tokenize_examples(files[client.name], client.tokenizer, config.data.max_length)
        }
        held = {tuple(s.input_ids.tolist()) for s in client.data.private}
        assert held == own and len(held) == 8
        others = [n for n in files if n != client.name]
        for other in others:
            theirs = {
                tuple(s.input_ids.tolist())
                for s in tokenize_examples(files[other], client.tokenizer, config.data.max_length)
            }
            assert not held & theirs
    assert server.data.private == []

    # One party built alone (as on its own machine) reads no other client's private source.
    read = []
    original = parts_module.load_source
    monkeypatch.setattr(
        parts_module, "load_source", lambda source, key, *a: read.append(key) or original(source, key, *a)
    )
    run_module.build_participant(config, "client_1")
    assert sorted(read) == ["clients[1].data", "data.eval", "data.public"]
    read.clear()
    run_module.build_participant(config, "server")
    assert sorted(read) == ["data.eval", "data.public"]


@pytest.mark.slow
def test_a_generation_task_ends_with_rouge_l(tmp_path):
    run_dir = tmp_path / "run"
    args = ["fit", "--config", "tiny", "--run_dir", str(run_dir), "--data.task", "nq_open", "--data.eval_size", "6"]
    args += ["--data.pool_size", "9", "--data.max_new_tokens", "4", "--federation.rounds", "1", *FAST]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for scores in [*summary["zero_shot"].values(), *summary["rounds"][0]["parties"].values()]:
        assert scores["eval_n"] == 6
        assert 0.0 <= scores["eval_rouge_l"] <= 1.0 and 0.0 <= scores["eval_exact_match"] <= 1.0
        assert "eval_accuracy" not in scores


def _without_lines(text: str, first: str, count: int) -> str:
    """`text` without the `count` lines that start at the line beginning with `first`."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    return "".join(lines[:start] + lines[start + count :])


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace(f"{FILES}/eval.jsonl", f"{FILES}/missing.jsonl"), "data.eval.path"),
        (lambda t: t.replace(f"{FILES}/eval.jsonl", f"{FILES}/public.jsonl"), "of data.eval are also in data.public"),
        (
            lambda t: t.replace(
                "columns: {id: qid, prompt: question, choices: options, answer: label}", "columns: {prompt: question}"
            ),
            "clients[1].data: ",
        ),
        (
            lambda t: t.replace("  task: null", "  task: null\n  eval_size: 5").replace(
                f"    path: {FILES}/eval.jsonl", "    path: embedded:nq_open"
            ),
            "generation",
        ),
        (
            lambda t: _without_lines(t, "  public:", 3),
            "data.public is not set and there is no data.task preset. Fix: set data.public",
        ),
    ],
    ids=["missing-file", "eval-overlaps-public", "column-map", "format-mismatch", "no-public"],
)
def test_data_errors_stop_before_any_model_loads(tmp_path, monkeypatch, capsys, edit, needle):
    def no_models(*args, **kwargs):
        raise AssertionError("a model loaded before the data was checked")

    monkeypatch.setattr(run_module, "load_model", no_models)
    monkeypatch.setattr(run_module, "load_tokenizer", no_models)
    text = edit(own_data_text())
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code = main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "run"), *FAST])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedmkt:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and "Fix:" in lines[0]
