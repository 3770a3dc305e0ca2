"""Round checkpoints: what a run saves after every round, and how `--resume` continues from one.

A checkpoint is every party's adapter, the parties' still-valid own public-data losses, the
summary so far and the RNG state. `checkpoint.json` is written last, so it only ever names a
round whose files are complete.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError, describe
from fedmkt.federation.checkpoint_record import read_checkpoint  # noqa: F401  (re-exported)
from fedmkt.federation.protocol import FederatedParty
from fedmkt.federation.summary import write_summary
from fedmkt.files import atomic_write_bytes, atomic_write_text, finite_or_none, json_default

RESUME_MAY_CHANGE = {"run_dir", "federation.rounds", "logging", "federation.backend", "flower"}
"""Config keys a resumed run may set otherwise than the checkpoint's: they do not change what it computes."""


def adapter_dir(run_dir: Path, round_index: int, party: str) -> Path:
    """Where one party's adapter of one round is saved."""
    return Path(run_dir) / "adapters" / f"round_{round_index}" / party


def _losses_file(run_dir: Path, party: str) -> Path:
    return Path(run_dir) / "checkpoint" / f"public_losses_{party}.safetensors"


def save_checkpoint(
    run_dir: Path,
    round_index: int,
    parties: Sequence[FederatedParty],
    summary: dict,
    adapter_sha256: Optional[dict[str, str]] = None,
) -> None:
    """The parties' own public losses, the summary and the checkpoint record, each atomic.

    Called once every party's adapter of `round_index` is saved (`adapter_dir`), and on rank 0
    only. `checkpoint.json` is written last, so it only ever names a round whose files are
    complete. `adapter_sha256` records adapters saved on other machines (Flower nodes), so a resumed
    run can check that each node restores the very adapter this round ended with.
    """
    for party in parties:
        losses = party.cached_public_losses()
        if losses is not None:
            atomic_write_bytes(_losses_file(run_dir, party.name), save_safetensors({"losses": losses.contiguous()}))
    write_summary(run_dir, summary)
    state = {"round": round_index, "summary": finite_or_none(summary), "rng": capture_rng_state()}
    if adapter_sha256:
        state["adapter_sha256"] = adapter_sha256
    atomic_write_text(
        Path(run_dir) / "checkpoint" / "checkpoint.json", json.dumps(state, default=json_default, allow_nan=False)
    )


def restore_checkpoint(run_dir: Path, parties: Sequence[FederatedParty], config: RunConfig, state: dict) -> dict:
    """Load the round `state` names into `parties` and restore the RNG; returns the summary to continue.

    `state` is the record `read_checkpoint` read; one saved under another config is refused.
    """
    check_resumable(state, config, run_dir)
    round_index = int(state["round"])
    for party in parties:
        directory = adapter_dir(run_dir, round_index, party.name)
        try:
            party.load_adapter(directory)
        except FedMKTError:
            raise
        except Exception as error:  # a truncated safetensors file, tensors of another shape, ...
            raise FedMKTError(
                f"{party.name}: the round {round_index} adapter in {directory} cannot be loaded ({describe(error)}). "
                "Fix: the checkpoint is damaged; start afresh with --overwrite (or another run_dir)."
            ) from error
        losses_file = _losses_file(run_dir, party.name)
        party.restore_public_losses(load_safetensors_file(losses_file)["losses"] if losses_file.is_file() else None)
    summary = state["summary"]
    summary["config"] = asdict(config)
    restore_rng_state(state["rng"])
    return summary


def check_resumable(state: dict, config: RunConfig, run_dir: Path) -> None:
    """Refuse a checkpoint saved under another config: the continued run would silently differ."""
    saved = state["summary"]["config"]
    current = _as_json(config)
    differing = [
        key
        for key in _differing_keys(saved, current, ignore=RESUME_MAY_CHANGE)
        if not _added_later_at_default(key, saved, config)
    ]
    if differing:
        raise FedMKTError(
            f"--resume config differs from the checkpoint's at {', '.join(differing)}. Fix: resume with {Path(run_dir) / 'config.yaml'}."
        )


def _added_later_at_default(dotted: str, saved: dict, config: RunConfig) -> bool:
    """True for a key the checkpoint lacks and the config leaves at its default.

    Such a key was added to fedmkt after the checkpoint was saved, and a new key's default keeps
    what the code did before it (`privacy.dp` off, for one), so the continued run computes the
    same as the interrupted one would have."""
    *parents, key = dotted.split(".")
    node: object = saved
    owner: object = config
    for part in parents:
        if not isinstance(node, dict) or part not in node or not is_dataclass(owner):
            return False
        node, owner = node[part], getattr(owner, part)
    if not isinstance(node, dict) or key in node or not is_dataclass(owner):
        return False
    declared = {f.name: f for f in fields(owner)}.get(key)
    if declared is None:
        return False
    if declared.default is not MISSING:
        default = declared.default
    elif declared.default_factory is not MISSING:
        default = declared.default_factory()
    else:
        return False
    return _as_json(getattr(owner, key)) == _as_json(default)


def _as_json(value: object) -> object:
    """A config value as the checkpoint stores it."""
    value = asdict(value) if is_dataclass(value) else value
    return finite_or_none(json.loads(json.dumps(value, default=json_default)))


def _differing_keys(saved: dict, current: dict, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, ignore, dotted + ".")
        elif a != b:
            keys.append(dotted)
    return keys


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as JSON-safe values."""
    numpy_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(_from_json(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, tuple) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
