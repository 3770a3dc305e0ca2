"""The config reference (`docs/configs.md`), generated from the config dataclasses' field docstrings.

The docstring under each field of `fedmkt.config` is the one description of a key: jsonargparse
shows it in `--help`, and this module renders it, with the key's type and default, as the page a
user reads. A test regenerates the page and checks that it matches the file and that every key of
every shipped YAML is documented.

    python -m fedmkt.config_reference > docs/configs.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from typing import Any, get_args, get_origin

from fedmkt import config as config_module

__all__ = ["field_docs", "config_keys", "render"]

SECTIONS = (
    ("top level", config_module.RunConfig, ""),
    ("server, and each item of clients", config_module.PartyConfig, ""),
    ("model", config_module.ModelSpec, "server.model, clients[i].model"),
    ("lora", config_module.LoRAConfig, "server.lora, clients[i].lora"),
    ("optimizer", config_module.OptimizerConfig, "server.optimizer, clients[i].optimizer"),
    ("trainer", config_module.TrainerConfig, "server.trainer, clients[i].trainer"),
    ("data", config_module.DataConfig, "data"),
    ("a data source", config_module.DataSource, "data.public, data.eval, clients[i].data, clients[i].eval"),
    ("transfer", config_module.TransferConfig, "transfer"),
    ("federation", config_module.FederationConfig, "federation"),
    ("privacy", config_module.PrivacyConfig, "privacy"),
    ("privacy.dp", config_module.DPConfig, "privacy.dp"),
    ("logging", config_module.LoggingConfig, "logging"),
    ("flower", config_module.FlowerConfig, "flower"),
)
"""Each config group once, in the order a YAML lists them, with where its keys sit."""


def field_docs(cls: type) -> dict[str, str]:
    """`{field: docstring}` of a dataclass: the string literal right under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def config_keys(cls: type) -> dict[str, str]:
    """`{key: description}` of a config group (its fields, in order)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls) if f.name in hints}


def render() -> str:
    """The Markdown reference of every config key."""
    lines = [
        "# Config reference",
        "",
        "Every key a run config (`fedmkt fit --config X.yaml`) can set, with its type, default and",
        "meaning. Generated from the field docstrings in `fedmkt/config.py` by",
        "`python -m fedmkt.config_reference > docs/configs.md`; a test keeps this page and the",
        "shipped YAMLs in step with the code. Any key can also be set on the command line",
        "(`--transfer.top_k 8`); `--print_config` prints the resolved config.",
    ]
    for title, cls, where in SECTIONS:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines += ["", f"## {title}", ""]
        summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split())
        lines.append(summary + (f" Keys under `{where}`." if where else ""))
        lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            kind = _type_name(hints[field.name])
            text = docs.get(field.name, "see its section below" if kind in ("section", "list of PartyConfig") else "")
            escaped = text.replace("|", "\\|")
            lines.append(f"| `{field.name}` | {kind} | {_default(field)} | {escaped} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
