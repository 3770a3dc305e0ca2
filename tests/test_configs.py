"""Every shipped YAML parses into a RunConfig and passes validation."""

from __future__ import annotations

import pytest
import yaml

from fedmkt.cli import parse_run_config, shipped_configs
from fedmkt.config import RunConfig, validate
from fedmkt.run import party_names

SHIPPED = sorted(shipped_configs())


def parse(config_path: str, *overrides: str) -> RunConfig:
    return parse_run_config(["--config", config_path, *overrides])


def test_the_paper_scenarios_and_embedded_configs_are_shipped():
    assert {"demo.yaml", "tiny.yaml", "heterogeneous.yaml", "homogeneous.yaml", "one_to_one.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_parses_and_validates(name):
    config = parse(str(shipped_configs()[name]))
    validate(config)
    assert isinstance(config, RunConfig)
    assert config.clients and config.server.model.source
    assert len(party_names(len(config.clients))) == len(config.clients) + 1


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_in_shipped_yaml_is_commented_or_grouped(name):
    """Each top-level group or scalar key line carries a comment (the YAML is the documentation)."""
    text = shipped_configs()[name].read_text()
    assert text.lstrip().startswith("#"), "config should open with a comment saying what it is"
    data = yaml.safe_load(text)
    assert set(data) <= set(RunConfig.__dataclass_fields__)


def test_paper_scenarios_use_the_papers_models_and_hyperparameters():
    hetero = parse(str(shipped_configs()["heterogeneous.yaml"]))
    assert hetero.server.model.source == "meta-llama/Llama-2-7b-hf"
    assert [c.model.source for c in hetero.clients] == [
        "gpt2-xl", "facebook/opt-1.3b", "bigscience/bloom-1b1", "princeton-nlp/Sheared-LLaMA-1.3B",
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
