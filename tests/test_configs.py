"""Every shipped YAML parses into a RunConfig and passes validation."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from fedmkt.config import RunConfig, config_key, parse_run_config, shipped_configs, validate

SHIPPED = sorted(shipped_configs())


def parse(config_path: str, *overrides: str) -> RunConfig:
    return parse_run_config(["--config", config_path, *overrides])


def test_the_paper_scenarios_and_embedded_configs_are_shipped():
    assert {"demo.yaml", "tiny.yaml", "heterogeneous.yaml", "homogeneous.yaml", "one_to_one.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_parses_and_validates(name):
    path = shipped_configs()[name]
    config = parse(str(path))
    validate(config)
    data = yaml.safe_load(path.read_text())
    # What the file says is what the run gets: models, clients, task and rounds come from the YAML.
    assert config.server.model.source == data["server"]["model"]["source"]
    assert [c.model.source for c in config.clients] == [c["model"]["source"] for c in data["clients"]]
    assert config.data.task == data["data"]["task"] and config.federation.rounds == data["federation"]["rounds"]
    assert config.transfer.top_k == data["transfer"]["top_k"] and config.seed == data["seed"]
    assert list(config.parties()) == ["server"] + [f"client_{i}" for i in range(len(config.clients))]
    assert [config_key(name) for name in config.parties()] == ["server"] + [
        f"clients[{i}]" for i in range(len(config.clients))
    ]


KEY_LINE = re.compile(r"^\s*(?:- )?[A-Za-z_]\w*:\s*(?P<value>[^#\s].*)?$")


def uncommented_keys(text: str) -> list[str]:
    """Lines that set a value with no comment on the line or directly above it (group headers exempt)."""
    lines = text.splitlines()
    missing = []
    for number, line in enumerate(lines, 1):
        match = KEY_LINE.match(line.split(" #")[0].rstrip()) if not line.lstrip().startswith("#") else None
        if not match or not match.group("value"):
            continue  # not a key, or a group header whose keys carry the comments
        if " #" in line or (number > 1 and lines[number - 2].lstrip().startswith("#")):
            continue
        missing.append(f"line {number}: {line.strip()}")
    return missing


def test_the_comment_check_finds_a_bare_key():
    assert uncommented_keys("# a config\nserver:\n  batch_size: 4   # training batch\n") == []
    assert uncommented_keys("server:\n  # training batch\n  batch_size: 4\n") == []
    assert uncommented_keys("server:\n  batch_size: 4\n  lora: {r: 8}  # rank\n") == ["line 2: batch_size: 4"]
    assert uncommented_keys("clients:\n  - model: {source: x}\n") == ["line 2: - model: {source: x}"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_in_shipped_yaml_is_commented(name):
    """The shipped YAML is the documentation: it opens with what it is, and every key says what it does."""
    text = shipped_configs()[name].read_text()
    assert text.lstrip().startswith("#"), "config should open with a comment saying what it is"
    assert uncommented_keys(text) == []
    assert set(yaml.safe_load(text)) <= set(RunConfig.__dataclass_fields__)


def test_paper_scenarios_use_the_papers_models_and_hyperparameters():
    hetero = parse(str(shipped_configs()["heterogeneous.yaml"]))
    assert hetero.server.model.source == "meta-llama/Llama-2-7b-hf"
    assert [c.model.source for c in hetero.clients] == [
        "gpt2-xl",
        "facebook/opt-1.3b",
        "bigscience/bloom-1b1",
        "princeton-nlp/Sheared-LLaMA-1.3B",
    ]
    assert hetero.clients[0].optimizer.lr == pytest.approx(3e-4)  # GPT-2-xl's lr in the paper
    assert hetero.transfer.ce_weight == pytest.approx(0.9)
    assert (hetero.server.lora.r, hetero.server.lora.alpha, hetero.server.lora.dropout) == (8, 16, 0.05)
    assert tuple(hetero.server.optimizer.betas) == (0.9, 0.95) and hetero.server.optimizer.weight_decay == 0.1
    assert len(parse(str(shipped_configs()["homogeneous.yaml"])).clients) == 4
    assert len(parse(str(shipped_configs()["one_to_one.yaml"])).clients) == 1


def test_command_line_overrides_any_key():
    config = parse("tiny", "--transfer.top_k", "3", "--server.optimizer.lr", "0.5", "--data.task", "boolq")
    assert config.transfer.top_k == 3
    assert config.server.optimizer.lr == 0.5
    assert config.data.task == "boolq"


def test_swapping_a_model_is_a_yaml_edit(tmp_path):
    text = shipped_configs()["tiny.yaml"].read_text().replace("embedded:gemma3-270m", "some-org/some-model", 1)
    path = tmp_path / "swapped.yaml"
    path.write_text(text)
    assert parse(str(path)).server.model.source == "some-org/some-model"


# ---- paths relative to the config file ----------------------------------------------------------


def test_a_configs_input_paths_are_read_from_its_folder_whatever_the_working_folder(tmp_path, monkeypatch):
    import shutil

    shipped = shipped_configs()["own_data.yaml"]
    moved = tmp_path / "project" / "configs"
    shutil.copytree(shipped.parent / "own_data", moved / "own_data")
    text = shipped.read_text().replace("path: own_data/eval.jsonl", "path: own_data/absent.jsonl")
    (moved / "mine.yaml").write_text(text.replace("source: embedded:gemma3-270m", "source: google/gemma-3-270m"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = parse_run_config(["--config", str(moved / "mine.yaml"), "--clients.1.data.path", "given.jsonl"])
    assert config.data.public.path == str(moved / "own_data" / "public.jsonl")
    assert config.clients[0].data.path == str(moved / "own_data" / "client_0.jsonl")
    assert config.clients[1].data.path == "given.jsonl"  # the command line still overrides
    assert config.clients[1].data.columns["prompt"] == "question"  # the rest of that client kept
    assert config.data.eval.path == "own_data/absent.jsonl"  # nothing there: left as written, for the error to name
    assert config.server.model.source == "google/gemma-3-270m"  # no such folder beside the config: a hub name
    assert config.clients[0].model.source == "embedded:smollm2-135m-instruct"
    assert config.run_dir == "runs/own_data"  # outputs stay relative to the working folder


def test_named_held_out_sets_and_absolute_paths_keep_their_other_keys(tmp_path):
    from fedmkt.config import config_relative_paths

    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "c.yaml").write_text(
        "data:\n  eval_sets:\n    first: {path: a.jsonl, limit: 3}\n    second: {path: /abs/b.jsonl}\n"
        "  public: {path: 'hub:owner/name', split: train}\n"
    )
    overrides = config_relative_paths(tmp_path / "c.yaml")
    assert overrides[0] == "--data.eval_sets" and len(overrides) == 2
    assert json.loads(overrides[1]) == {
        "first": {"path": str(tmp_path / "a.jsonl"), "limit": 3},
        "second": {"path": "/abs/b.jsonl"},
    }
