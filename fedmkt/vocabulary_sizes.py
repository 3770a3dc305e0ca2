"""Each party's vocabulary size, recorded once per tokenizer, for the checks a config needs before a run.

`transfer.top_k` must fit every vocabulary, and `--print_config` runs that check; reading a
262k-token tokenizer (and importing transformers to do it) takes seconds, the answer a second. So
the size is read from the real tokenizer once and recorded under the cache root, keyed by what
the tokenizer comes from: a GGUF file's path, size and mtime; every file of a local folder; a hub
name with its revision and cached snapshot. Any change to those reads the tokenizer again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from fedmkt.config import ModelSpec, RunConfig, config_key
from fedmkt.errors import FedMKTError
from fedmkt.files import atomic_write_text
from fedmkt.model_sources import ResolvedSource, cache_root, resolve_source


def tokenizer_fingerprint(resolved: ResolvedSource, revision: Optional[str]) -> str:
    """A digest that changes whenever the tokenizer a resolved source loads could have changed."""
    parts = [resolved.path, resolved.gguf_file or "", revision or ""]
    path = Path(resolved.path)
    if resolved.gguf_file is not None:
        stat = (path / resolved.gguf_file).stat()
        parts.append(f"{stat.st_size}|{stat.st_mtime_ns}")
    elif path.is_dir():
        for entry in sorted(path.iterdir()):
            if entry.is_file():
                stat = entry.stat()
                parts.append(f"{entry.name}|{stat.st_size}|{stat.st_mtime_ns}")
    else:  # a hub name: the cached snapshot (a commit) pins the files; none cached, the name alone
        from huggingface_hub import try_to_load_from_cache

        snapshot = try_to_load_from_cache(resolved.path, "tokenizer_config.json", revision=revision)
        parts.append(snapshot if isinstance(snapshot, str) else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def vocabulary_size(spec: ModelSpec, cache_dir: Optional[str] = None, key: str = "model.source") -> int:
    """len(tokenizer) of `spec`'s tokenizer: the recorded value, or the tokenizer read once and recorded."""
    resolved = resolve_source(spec.source, key)
    record = cache_root(cache_dir) / "vocabulary_sizes" / f"{tokenizer_fingerprint(resolved, spec.revision)}.json"
    try:
        return int(json.loads(record.read_text())["size"])
    except (OSError, ValueError, KeyError, TypeError):  # not recorded yet, or a damaged record
        pass
    from fedmkt.models import load_tokenizer

    size = len(load_tokenizer(spec, cache_dir, key))
    atomic_write_text(record, json.dumps({"source": spec.source, "revision": spec.revision, "size": size}))
    return size


def validate_against_vocabularies(config: RunConfig, unreadable: Optional[list[str]] = None) -> None:
    """Checks that need each party's tokenizer: `transfer.top_k` must fit every vocabulary.

    With `unreadable` (a list), a tokenizer this machine cannot load (a hub model out of reach, a
    path on another machine) is noted there and its check skipped, instead of stopping.
    """
    for name, party in config.parties().items():
        try:
            size = vocabulary_size(party.model, config.cache_dir, key=f"{config_key(name)}.model.source")
        except FedMKTError as error:
            if unreadable is None:
                raise
            unreadable.append(f"{config_key(name)}'s tokenizer is not readable here ({error})")
            continue
        if config.transfer.top_k > size:
            raise FedMKTError(
                f"transfer.top_k={config.transfer.top_k} exceeds {config_key(name)}'s vocabulary of {size} tokens. "
                f"Fix: set transfer.top_k to at most {size} (e.g. 16)."
            )
