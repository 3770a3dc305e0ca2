"""docs/configs.md: generated from the config dataclasses, and covering every key the shipped YAMLs use."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from fedmkt import config as config_module
from fedmkt.config import shipped_configs
from fedmkt.config_reference import SECTIONS, field_docs, render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configs.md"


def test_the_page_is_what_the_dataclasses_generate():
    assert DOCS.read_text() == render(), "regenerate it: python -m fedmkt.config_reference > docs/configs.md"


def test_every_field_of_every_group_has_a_description():
    for _, cls, _ in SECTIONS:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(hints[field.name]) and field.name not in ("server",)
            assert nested or docs.get(field.name), f"{cls.__name__}.{field.name} has no docstring"


def _documented_keys(tree: dict, cls: type, where: str) -> list[str]:
    """Keys of a YAML mapping that are not documented fields of `cls` (recursing into sections)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    missing = []
    for key, value in tree.items():
        if key not in hints:
            missing.append(f"{where}{key}")
            continue
        kind = hints[key]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
        target = kind if dataclasses.is_dataclass(kind) else (inner[0] if inner else None)
        if target is not None and isinstance(value, dict):
            missing += _documented_keys(value, target, f"{where}{key}.")
        elif target is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    missing += _documented_keys(item, target, f"{where}{key}[{i}].")
        elif not docs.get(key) and target is None:
            missing.append(f"{where}{key}")
    return missing


def test_every_key_of_every_shipped_yaml_is_documented():
    for name, path in shipped_configs().items():
        tree = yaml.safe_load(path.read_text())
        assert _documented_keys(tree, config_module.RunConfig, "") == [], name
