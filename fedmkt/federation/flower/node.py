"""What a SuperNode owns: which client it serves, that client's private data, model and output folder.

A client's private data, its own evaluation set, its model and the folder it writes to are set
on its own machine, never by the server: as `flower-supernode --node-config` keys, or in a
node-local YAML file that the `settings` key names (node-config keys win over the file).

  partition-id   N: this node serves client_N (required)
  data           path of the private training set (a file, a save_to_disk folder, embedded:TASK, hub:NAME)
  eval           path of the client's own held-out set (optional)
  model          base model source (hub name, local dir, .gguf, embedded:NAME); other model
                 settings (random_init, dtype) stay those of the run config
  output-dir     folder the node writes its adapters into (default: ./fedmkt-client_N)
  keep-alive-s   seconds the node's worker keeps the built party after its last message
                 (default 1800; 0: no worker, every message rebuilds the party; see worker.py)
  settings       a YAML file with the same keys, where `data`/`eval` may be full data sources
                 ({path, name, split, format, columns, limit}) and `model` a full model spec

The node applies these to the shared run config it receives, so `build_participant` reads this
client's private source and no other. Paths the server sends are checked against the output folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from fedmkt.config import DataSource, ModelSpec, RunConfig
from fedmkt.errors import FedMKTError

NODE_KEYS = ("partition-id", "data", "eval", "model", "output-dir", "keep-alive-s", "settings")
"""The `--node-config` keys fedmkt reads (and the keys of a `settings` file)."""


@dataclass
class NodeSettings:
    """One SuperNode's own settings for the client it serves."""

    index: int
    output_dir: Path
    data: Optional[DataSource] = None
    eval: Optional[DataSource] = None
    model: Optional[ModelSpec] = None
    model_source_only: bool = True
    """`model` came as a bare source: the run config's other model settings are kept."""
    keep_alive_s: float = 1800.0
    """How long the node's worker keeps the built party without a message (0: no worker)."""

    @property
    def client(self) -> str:
        return f"client_{self.index}"


def node_settings(node_config: dict, num_clients: Optional[int] = None) -> NodeSettings:
    """This node's settings from its `--node-config` (and the `settings` file it names)."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise FedMKTError(
            f"unknown --node-config key(s) {', '.join(unknown)}. Fix: use only {', '.join(NODE_KEYS)} (see docs/flower.md)."
        )
    values: dict[str, Any] = {}
    if node_config.get("settings"):
        values |= _settings_file(Path(str(node_config["settings"])).expanduser())
    values |= {key: value for key, value in node_config.items() if key != "settings"}
    index = _partition_index(values.get("partition-id"), num_clients)
    model, source_only = _model(values.get("model"))
    output = values.get("output-dir")
    return NodeSettings(
        index=index,
        output_dir=Path(str(output)).expanduser() if output else Path.cwd() / f"fedmkt-client_{index}",
        data=_source(values.get("data"), "data"),
        eval=_source(values.get("eval"), "eval"),
        model=model,
        model_source_only=source_only,
        keep_alive_s=_keep_alive(values.get("keep-alive-s")),
    )


def apply_to_config(settings: NodeSettings, config: RunConfig) -> RunConfig:
    """The shared run config with this node's own data, evaluation set and model for its client."""
    if settings.index >= len(config.clients):
        raise FedMKTError(
            f"partition-id {settings.index} names no client of this run ({len(config.clients)} clients). "
            f"Fix: use partition-id 0 to {len(config.clients) - 1}."
        )
    config = dataclasses.replace(config, clients=list(config.clients))
    party = config.clients[settings.index]
    model = party.model
    if settings.model is not None:
        model = (
            dataclasses.replace(model, source=settings.model.source) if settings.model_source_only else settings.model
        )
    config.clients[settings.index] = dataclasses.replace(party, data=settings.data, eval=settings.eval, model=model)
    return config


def inside_output_dir(settings: NodeSettings, relative: str) -> Path:
    """`relative` (sent by the server) under this node's output folder; anything that could leave it is refused."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts or "\\" in relative:
        raise FedMKTError(
            f"refused to write to {relative!r}: a node writes only inside its own output folder {settings.output_dir}, "
            "and the server may name only a relative path without '..'. Fix: run the same fedmkt version on the server."
        )
    root = settings.output_dir.resolve()
    target = (root / Path(*path.parts)).resolve()
    if not target.is_relative_to(root):  # a symbolic link inside the folder that points out of it
        raise FedMKTError(
            f"refused to write to {relative!r}: it resolves to {target}, outside this node's output folder {root}. "
            "Fix: remove the symbolic link there."
        )
    return target


def _partition_index(value: Any, num_clients: Optional[int]) -> int:
    if value is None:
        raise FedMKTError(
            "this SuperNode has no partition-id. Fix: start it with `flower-supernode ... --node-config partition-id=N` "
            "(N = 0 for client_0, 1 for client_1, ...)."
        )
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise FedMKTError(
            f"partition-id {value!r} is not an integer. Fix: use --node-config partition-id=N with N = 0, 1, ..."
        ) from None
    if index < 0 or (num_clients is not None and index >= num_clients):
        raise FedMKTError(f"partition-id {index} names no client of this run. Fix: use 0 to {(num_clients or 1) - 1}.")
    return index


def _keep_alive(value: Any) -> float:
    if value is None or value == "":
        return NodeSettings.keep_alive_s
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise FedMKTError(
            f"keep-alive-s {value!r} is not a number of seconds >= 0. Fix: use e.g. keep-alive-s=1800 (0: no worker)."
        )
    return seconds


def _settings_file(path: Path) -> dict:
    if not path.is_file():
        raise FedMKTError(
            f"--node-config settings={path}: no such file on this node. Fix: point it at this node's YAML settings file."
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise FedMKTError(
            f"node settings {path} is not readable YAML ({type(error).__name__}). Fix: correct the file."
        ) from None
    if not isinstance(values, dict):
        raise FedMKTError(f"node settings {path} is not a mapping of keys. Fix: write `key: value` lines.")
    values = {str(key).replace("_", "-"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(NODE_KEYS) - {"settings"}) + (["settings"] if "settings" in values else [])
    if unknown:
        raise FedMKTError(
            f"node settings {path}: unknown key(s) {', '.join(unknown)}. "
            f"Fix: use only {', '.join(k for k in NODE_KEYS if k != 'settings')}."
        )
    return values


def _spec(value: Any, cls: type, required: str, key: str, short: str, long: str) -> tuple[Any, bool]:
    """A `cls` from a node setting given as its `required` field alone (a string) or as a mapping of
    its fields; returns (spec or None, whether it came as the string form)."""
    if value is None or value == "":
        return None, True
    if isinstance(value, str):
        return cls(**{required: value}), True
    if isinstance(value, dict):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown or required not in value:
            raise FedMKTError(
                f"node setting {key}: {'unknown key(s) ' + ', '.join(unknown) if unknown else 'no ' + required}. "
                f"Fix: give {key} as a {short}, or as a {long} with keys {', '.join(sorted(fields))}."
            )
        return cls(**value), False
    raise FedMKTError(f"node setting {key} is a {type(value).__name__}. Fix: give a {short} or a {long}.")


def _source(value: Any, key: str) -> Optional[DataSource]:
    return _spec(value, DataSource, "path", key, "path", "data source")[0]


def _model(value: Any) -> tuple[Optional[ModelSpec], bool]:
    return _spec(value, ModelSpec, "source", "model", "source", "model spec")
