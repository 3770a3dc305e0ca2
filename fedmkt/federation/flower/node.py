"""What a SuperNode owns: which client it serves, that client's private data, model and output folder.

A client's private data, its own evaluation set, its model and the folder it writes to are set
on its own machine, never by the server: as `flower-supernode --node-config` keys, or in a
node-local YAML file that the `settings` key names (node-config keys win over the file).

  partition-id   N: this node serves client_N (required)
  data           path of the private training set (a file, a save_to_disk folder, embedded:TASK, hub:NAME)
  eval           path of the client's own held-out set (optional)
  model          base model source (hub name, local dir, .gguf, embedded:NAME); other model
                 settings (random_init, dtype) stay those of the run config
  output-dir     the node's folder (default: ./fedmkt-client_N); each run's adapters go to their own
                 subfolder `runs/<the server's run folder name>/`, so that no run overwrites another's
  run-dir        instead, the one folder this node's run writes into (`launch-local` sets it to the
                 run folder, as `fit` would use)
  keep-alive-s   seconds the node's worker keeps the built party after its last message
                 (default 1800; 0: no worker, every message rebuilds the party; see worker.py)
  settings       a YAML file with the same keys, where `data`/`eval` may be full data sources
                 ({path, name, split, format, columns, limit}) and `model` a full model spec

The node's policy, which the server's run config must fit (checked before any model or file opens):

  allow-remote-code   run a model's or tokenizer's own code from the hub (default false: never)
  public, shared-eval the files this node agrees to read as the run's `data.public` / `data.eval`
  data-dir            the folder it agrees to read as `data.data_dir` (embedded tasks need nothing)
  *-sha256            (public-sha256, shared-eval-sha256, data-dir-sha256) the content digest that
                      file or folder must still have (`fedmkt.federation.flower.node.content_sha256`)
  max-length          the largest `data.max_length` it accepts (default 4096)
  max-batch-size      the largest batch (`batch_size`, `eval_batch_size`) it accepts (default 256)
  max-epochs          the largest `local_epochs` / `distill_epochs` it accepts (default 20)
  min-logit-noise     its own least `privacy.logit_noise` on the logits it shares (default 0)
  max-top-k           the most logits per position it shares (`transfer.top_k`; default: no cap)
  max-logit-clip      the largest `privacy.logit_clip` it accepts (default: no cap)
  require-dp          its private fine-tuning must run under DP-SGD (`privacy.dp.enabled`; default false)
  max-dp-epsilon      the most epsilon the run may spend on its data (`privacy.dp.target_epsilon`;
                      setting it requires DP, with a target epsilon the node can check before it reads its data)
  max-dp-delta        the largest `privacy.dp.delta` it accepts
  fedavg              whether it sends its adapter weights for FedAvg (default false: weights never leave it)
  cache-dir           where it keeps converted models and vocabulary maps (the server's cache_dir is ignored)
  trusted-apps        sha256 of Flower apps (FABs) it runs besides the fedmkt app its own installation
                      builds, which it always runs (`app_trust.py`; default: no other)

The node applies its settings to the shared run config it receives, so `build_participant` reads
this client's private source and no other. Paths the server sends are checked against the output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from fedmkt.config import DataSource, ModelSpec, RunConfig
from fedmkt.errors import FedMKTError

POLICY_KEYS = (
    "allow-remote-code",
    "public",
    "public-sha256",
    "shared-eval",
    "shared-eval-sha256",
    "data-dir",
    "data-dir-sha256",
    "max-length",
    "max-batch-size",
    "max-epochs",
    "min-logit-noise",
    "max-top-k",
    "max-logit-clip",
    "require-dp",
    "max-dp-epsilon",
    "max-dp-delta",
    "fedavg",
    "cache-dir",
    "trusted-apps",
)
NODE_KEYS = ("partition-id", "data", "eval", "model", "output-dir", "run-dir", "keep-alive-s", "settings", *POLICY_KEYS)
"""The `--node-config` keys fedmkt reads (and the keys of a `settings` file)."""

SHARED_SOURCES = {"public": "data.public", "shared-eval": "data.eval", "data-dir": "data.data_dir"}
"""Policy key -> the run-config key whose file or folder it allows."""


@dataclass(frozen=True)
class NodePolicy:
    """What this node lets a run do on it, whatever the server's config asks."""

    allow_remote_code: bool = False
    allowed: tuple[tuple[str, str, Optional[str]], ...] = ()
    """(run-config key, path, sha256 or None) of each shared file or folder the node agrees to read."""
    max_length: int = 4096
    max_batch_size: int = 256
    max_epochs: int = 20
    min_logit_noise: float = 0.0
    max_top_k: Optional[int] = None
    max_logit_clip: Optional[float] = None
    require_dp: bool = False
    max_dp_epsilon: Optional[float] = None
    max_dp_delta: Optional[float] = None
    fedavg: bool = False
    cache_dir: Optional[str] = None
    trusted_apps: tuple[str, ...] = ()
    """sha256 of the Flower apps it runs besides its own fedmkt app (`app_trust.py`)."""


@dataclass
class NodeSettings:
    """One SuperNode's own settings for the client it serves."""

    index: int
    output_dir: Path
    """The node's own folder (its worker's socket, and `runs/<run>/` for each run's outputs)."""
    run_dir: Optional[Path] = None
    """Set: every run this node serves writes here (a node started for one run); unset: per-run folders."""
    data: Optional[DataSource] = None
    eval: Optional[DataSource] = None
    model: Optional[ModelSpec] = None
    model_source_only: bool = True
    """`model` came as a bare source: the run config's other model settings are kept."""
    keep_alive_s: float = 1800.0
    """How long the node's worker keeps the built party without a message (0: no worker)."""
    policy: NodePolicy = NodePolicy()
    """What the node lets a run do (see the module docstring)."""

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
        run_dir=Path(str(values["run-dir"])).expanduser() if values.get("run-dir") else None,
        data=_source(values.get("data"), "data"),
        eval=_source(values.get("eval"), "eval"),
        model=model,
        model_source_only=source_only,
        keep_alive_s=_keep_alive(values.get("keep-alive-s")),
        policy=_policy(values),
    )


def apply_to_config(settings: NodeSettings, config: RunConfig) -> RunConfig:
    """The shared run config with this node's own data, evaluation set, model and policy for its client.

    The server's config is checked against the node's policy first (`check_policy`); nothing is
    opened before that.
    """
    if settings.index >= len(config.clients):
        raise FedMKTError(
            f"partition-id {settings.index} names no client of this run ({len(config.clients)} clients). "
            f"Fix: use partition-id 0 to {len(config.clients) - 1}."
        )
    check_policy(settings, config)
    policy = settings.policy
    config = dataclasses.replace(config, clients=list(config.clients))
    party = config.clients[settings.index]
    model = party.model
    if settings.model is not None:
        # A bare source keeps the run's random_init and dtype; what code runs and which revision
        # loads are the node's alone (never the server's).
        own = dataclasses.replace(model, source=settings.model.source, revision=None, trust_remote_code=False)
        model = own if settings.model_source_only else settings.model
    config.clients[settings.index] = dataclasses.replace(party, data=settings.data, eval=settings.eval, model=model)
    noise = max(config.privacy.logit_noise, policy.min_logit_noise)
    config.privacy = dataclasses.replace(config.privacy, logit_noise=noise)
    config.cache_dir = policy.cache_dir  # the node's own cache; the server's path is never used here
    return config


def check_policy(settings: NodeSettings, config: RunConfig) -> None:
    """Refuse a run config that asks this node for more than its policy allows (one line: key and fix)."""
    policy, client = settings.policy, config.clients[settings.index]
    problems = []
    specs = {"server.model": config.server.model}  # loaded here for its tokenizer
    if settings.model is None:  # the node loads the run's model for its client; its own model is its own choice
        specs[f"clients[{settings.index}].model"] = client.model
    for key, spec in specs.items():
        if spec.trust_remote_code and not policy.allow_remote_code:
            problems.append(f"{key}.trust_remote_code is true but this node runs no remote code (allow-remote-code)")
    if config.data.max_length > policy.max_length:
        problems.append(f"data.max_length {config.data.max_length} > this node's max-length {policy.max_length}")
    for key in ("batch_size", "eval_batch_size"):
        if getattr(client, key) > policy.max_batch_size:
            problems.append(
                f"clients[{settings.index}].{key} {getattr(client, key)} > this node's max-batch-size {policy.max_batch_size}"
            )
    for key in ("local_epochs", "distill_epochs"):
        if getattr(client, key) > policy.max_epochs:
            problems.append(
                f"clients[{settings.index}].{key} {getattr(client, key)} > this node's max-epochs {policy.max_epochs}"
            )
    if config.federation.mode == "fedavg" and not policy.fedavg:
        problems.append("federation.mode is fedavg but this node does not send its adapter weights (fedavg)")
    problems += _privacy_problems(policy, config)
    problems += _shared_source_problems(policy, config)
    if problems:
        raise FedMKTError(
            f"{settings.client}'s node refuses this run: {'; '.join(problems)}. "
            "Fix: change those keys in the run config, or (node operator) widen the node's policy in its settings."
        )


def _privacy_problems(policy: NodePolicy, config: RunConfig) -> list[str]:
    """What the run would reveal of this node's data beyond what its policy allows."""
    problems = []
    if policy.max_top_k is not None and config.transfer.top_k > policy.max_top_k:
        problems.append(f"transfer.top_k {config.transfer.top_k} > this node's max-top-k {policy.max_top_k}")
    if policy.max_logit_clip is not None and config.privacy.logit_clip > policy.max_logit_clip:
        problems.append(
            f"privacy.logit_clip {config.privacy.logit_clip} > this node's max-logit-clip {policy.max_logit_clip}"
        )
    dp = config.privacy.dp
    needs_dp = policy.require_dp or policy.max_dp_epsilon is not None or policy.max_dp_delta is not None
    if needs_dp and not dp.enabled:
        problems.append("privacy.dp.enabled is false but this node requires DP-SGD on its data (require-dp / max-dp-*)")
    if not dp.enabled:
        return problems
    if policy.max_dp_epsilon is not None:
        if dp.target_epsilon is None:
            problems.append(
                "privacy.dp.target_epsilon is null (a noise_multiplier alone), so this node cannot bound epsilon "
                f"before it reads its data; set privacy.dp.target_epsilon <= its max-dp-epsilon {policy.max_dp_epsilon}"
            )
        elif dp.target_epsilon > policy.max_dp_epsilon:
            problems.append(
                f"privacy.dp.target_epsilon {dp.target_epsilon} > this node's max-dp-epsilon {policy.max_dp_epsilon}"
            )
    if policy.max_dp_delta is not None and dp.delta > policy.max_dp_delta:
        problems.append(f"privacy.dp.delta {dp.delta} > this node's max-dp-delta {policy.max_dp_delta}")
    return problems


def _shared_source_problems(policy: NodePolicy, config: RunConfig) -> list[str]:
    """The shared files and folders the run names that the node's policy does not list (or whose content changed)."""
    named = {
        "data.public": config.data.public.path if config.data.public else None,
        "data.eval": config.data.eval.path if config.data.eval else None,
        "data.data_dir": config.data.data_dir,
    }
    allowed = {key: (path, digest) for key, path, digest in policy.allowed}
    problems = []
    for key, path in named.items():
        if path is None or (key != "data.data_dir" and str(path).startswith("embedded:")):
            continue  # the preset's parts, or a task the package ships: nothing of the node's is opened
        if key not in allowed or Path(str(path)).expanduser() != Path(allowed[key][0]).expanduser():
            problems.append(f"{key} names {path}, which this node's policy does not list")
            continue
        expected = allowed[key][1]
        if expected is not None and content_sha256(Path(str(path)).expanduser()) != expected:
            problems.append(f"{key} ({path}) no longer has the content digest this node's policy names")
    return problems


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative paths and bytes, in sorted order)."""
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if not path.is_dir():
        raise FedMKTError(f"{path} does not exist on this node. Fix: correct the node's policy path.")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + content_sha256(file).encode())
    return digest.hexdigest()


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_folder(settings: NodeSettings, run: str) -> Path:
    """Where this node keeps the outputs of the run named `run` (the server's run folder name):
    `<output-dir>/runs/<run>`, so that two runs served by one node never write over each other."""
    if settings.run_dir is not None:
        return settings.run_dir
    if not _RUN_NAME.fullmatch(run or ""):
        raise FedMKTError(
            f"refused the run name {run!r}: a node keeps each run's outputs under runs/<name>, and the name must be "
            "one folder name of letters, digits, '.', '_' or '-'. Fix: give the run folder such a name, "
            "and run the same fedmkt version on the server."
        )
    folder = settings.output_dir / "runs" / run
    if not folder.resolve().is_relative_to(settings.output_dir.resolve()):  # a symbolic link out of the node's folder
        raise FedMKTError(
            f"refused to write to {folder}: it resolves to {folder.resolve()}, outside this node's output folder "
            f"{settings.output_dir.resolve()}. Fix: remove the symbolic link there."
        )
    return folder


def inside_output_dir(settings: NodeSettings, run: str, relative: str) -> Path:
    """`relative` (sent by the server) under this run's folder on this node; anything that could leave it is refused."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts or "\\" in relative:
        raise FedMKTError(
            f"refused to write to {relative!r}: a node writes only inside its own output folder {settings.output_dir}, "
            "and the server may name only a relative path without '..'. Fix: run the same fedmkt version on the server."
        )
    root = run_folder(settings, run).resolve()
    target = (root / Path(*path.parts)).resolve()
    if not target.is_relative_to(root):  # a symbolic link inside the folder that points out of it
        raise FedMKTError(
            f"refused to write to {relative!r}: it resolves to {target}, outside this node's output folder {root}. "
            "Fix: remove the symbolic link there."
        )
    return target


def _policy(values: dict) -> NodePolicy:
    """The node's policy from its settings (defaults for what it does not set)."""
    defaults = NodePolicy()
    allowed = []
    for key, config_key in SHARED_SOURCES.items():
        if values.get(key):
            digest = values.get(f"{key}-sha256")
            allowed.append((config_key, str(values[key]), str(digest) if digest else None))
        elif values.get(f"{key}-sha256"):
            raise FedMKTError(
                f"node setting {key}-sha256 is set without {key}. Fix: name the path it is the digest of."
            )
    return NodePolicy(
        allow_remote_code=_flag(values.get("allow-remote-code"), "allow-remote-code"),
        allowed=tuple(allowed),
        max_length=_positive(values.get("max-length"), "max-length", defaults.max_length),
        max_batch_size=_positive(values.get("max-batch-size"), "max-batch-size", defaults.max_batch_size),
        max_epochs=_positive(values.get("max-epochs"), "max-epochs", defaults.max_epochs),
        min_logit_noise=_noise(values.get("min-logit-noise")),
        max_top_k=_positive(values.get("max-top-k"), "max-top-k", None),
        max_logit_clip=_positive_number(values.get("max-logit-clip"), "max-logit-clip"),
        require_dp=_flag(values.get("require-dp"), "require-dp"),
        max_dp_epsilon=_positive_number(values.get("max-dp-epsilon"), "max-dp-epsilon"),
        max_dp_delta=_positive_number(values.get("max-dp-delta"), "max-dp-delta"),
        fedavg=_flag(values.get("fedavg"), "fedavg"),
        cache_dir=str(Path(str(values["cache-dir"])).expanduser()) if values.get("cache-dir") else None,
        trusted_apps=_digests(values.get("trusted-apps")),
    )


def _digests(value: Any) -> tuple[str, ...]:
    """sha256 hex digests from a YAML list or a comma-separated string."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    digests = tuple(str(item).strip().lower() for item in items if str(item).strip())
    wrong = [digest for digest in digests if not re.fullmatch(r"[0-9a-f]{64}", digest)]
    if wrong:
        raise FedMKTError(
            f"node setting trusted-apps holds {wrong[0]!r}, not a sha256. Fix: list each app's 64-hex-digit FAB sha256."
        )
    return digests


def _flag(value: Any, key: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise FedMKTError(f"node setting {key} is {value!r}. Fix: use true or false.")


def _positive_number(value: Any, key: str) -> Optional[float]:
    """A cap the node sets (a number > 0), or None where it sets none."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise FedMKTError(f"node setting {key} is {value!r}. Fix: use a number > 0.")
    return number


def _positive(value: Any, key: str, default: Optional[int]) -> Optional[int]:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise FedMKTError(f"node setting {key} is {value!r}. Fix: use a whole number >= 1.")
    return number


def _noise(value: Any) -> float:
    if value is None or value == "":
        return 0.0
    try:
        noise = float(value)
    except (TypeError, ValueError):
        noise = -1.0
    if not noise >= 0:
        raise FedMKTError(f"node setting min-logit-noise is {value!r}. Fix: use a number >= 0.")
    return noise


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
