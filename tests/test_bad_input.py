"""Bad input everywhere: one line naming the problem and the fix, exit code 2, no partial files.

Config values, model files, tokenizers, dataset folders and received payloads. Row-level data and
payload validation already have unit tests (test_tasks.py, test_payload.py); here the same inputs
go through `fedmkt fit` end to end, plus what those tests do not cover.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fedmkt.payload as payload_module
from fedmkt.cli import main
from fedmkt.config import ModelSpec, PartyConfig, RunConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.protocol import PhaseStats
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.payload import KnowledgePayload

FAST = ["--logging.wandb", "false", "--logging.csv", "false", "--federation.evaluate_before", "false"]


def _temporaries(folder: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes: dot-prefixed temporaries or `.tmp` files."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name] if folder.exists() else []


def _assert_nothing_partial(run_dir: Path) -> None:
    assert not _temporaries(run_dir)
    for written_by_a_round in ("summary.json", "checkpoint", "adapters"):
        assert not (run_dir / written_by_a_round).exists(), written_by_a_round


ERROR_LINE = re.compile(r"fedmkt: (\w+ )?error")
"""How an error line starts (`fedmkt: error: …`, `fedmkt: config error: …`)."""


def _converted(cache: Path) -> list[Path]:
    """What the cache holds of converted GGUF models and tokenizers."""
    return [entry for kind in ("models", "tokenizers") if (cache / kind).is_dir() for entry in (cache / kind).iterdir()]


def fit_error(capsys, run_dir: Path, *args: str) -> str:
    """`fedmkt fit --config tiny ARGS` in-process: exit code 2 and one `fedmkt: …` line, no traceback."""
    code = main(["fit", "--config", "tiny", "--run_dir", str(run_dir), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]  # progress lines may come before it
    assert len(lines) == 1, err
    assert "Fix:" in lines[0]
    _assert_nothing_partial(run_dir)
    return lines[0]


# ---- config values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--federation.mode", "fedprox"], 'key "federation.mode"'),
        (["--federation.min_clients", "3"], "federation.min_clients must be between 1 and the number of clients (2)"),
        (["--federation.min_clients", "0"], "federation.min_clients must be between 1 and the number of clients (2)"),
        (["--federation.client_timeout_s", "0"], "federation.client_timeout_s must be > 0"),
        (["--privacy.logit_noise", "-1"], "privacy.logit_noise must be >= 0"),
        (["--privacy.logit_clip", "0"], "privacy.logit_clip must be > 0"),
        (["--privacy.noise", "1"], "--privacy.noise"),
        (["--transfer.sequence_alignment", "nearest"], 'key "transfer.sequence_alignment"'),
    ],
    ids=[
        "unknown-mode",
        "min-clients-above-clients",
        "min-clients-zero",
        "timeout-zero",
        "negative-noise",
        "zero-clip",
        "unknown-key",
        "unknown-sequence-alignment",
    ],
)
def test_config_errors_stop_before_anything_is_written(args, needle, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert needle in fit_error(capsys, run_dir, *args)
    assert not run_dir.exists()  # rejected before the run directory is made


def test_unknown_mode_in_a_yaml_file(tmp_path, capsys):
    from fedmkt.config import shipped_configs

    config = tmp_path / "bad.yaml"
    config.write_text(shipped_configs()["tiny.yaml"].read_text().replace("mode: fedmkt", "mode: fedprox"))
    code = main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "run")])
    line = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in line and "federation.mode" in line and "fedprox" in line and "Fix:" in line


# ---- model files and tokenizers ---------------------------------------------------------------------


def _tiny_llama_config(folder: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(folder)


@pytest.mark.slow
def test_corrupt_gguf_is_one_line_in_a_real_process(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(os.urandom(4096))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmkt.cli",
            "fit",
            "--config",
            "tiny",
            "--server.model.source",
            str(corrupt),
            "--run_dir",
            str(run_dir),
            "--cache_dir",
            str(cache),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert (
        re.search("could not read (the tokenizer of )?GGUF file", lines[0])
        and str(corrupt) in lines[0]
        and "Fix:" in lines[0]
    )
    _assert_nothing_partial(run_dir)
    assert not _temporaries(cache) and not _converted(cache)  # no half-converted model or tokenizer


def test_truncated_gguf_names_the_file(tmp_path, capsys):
    from conftest import SMOLLM2_GGUF, smollm2_dir

    truncated = tmp_path / "truncated.gguf"  # an interrupted download: header and vocabulary, half a tensor
    with open(smollm2_dir() / SMOLLM2_GGUF, "rb") as file:
        truncated.write_bytes(file.read(3_000_000))
    cache = tmp_path / "cache"
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(truncated), "--cache_dir", str(cache))
    assert re.search("could not read (the tokenizer of )?GGUF file", line) and "truncated.gguf" in line
    assert not _temporaries(cache) and not _converted(cache)


def test_model_directory_without_config_json(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(folder))
    assert "has no config.json" in line and str(folder) in line


def test_model_directory_without_tokenizer_files(tmp_path, capsys):
    folder = tmp_path / "model"
    _tiny_llama_config(folder)
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(folder))
    assert "could not load a tokenizer" in line and str(folder) in line


def test_tokenizer_without_a_vocabulary(tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "model"
    _tiny_llama_config(folder)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab={}, unk_token="[UNK]"))).save_pretrained(folder)
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(folder))
    assert "has no vocabulary" in line


def test_corrupt_tokenizer_json(tmp_path, capsys):
    folder = tmp_path / "model"
    _tiny_llama_config(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(folder))
    assert "could not load a tokenizer" in line


def test_config_json_without_model_type(tmp_path, capsys, smollm2_tokenizer):
    folder = tmp_path / "model"
    folder.mkdir()
    smollm2_tokenizer.save_pretrained(folder)  # a working tokenizer, so the failure is the model's
    (folder / "config.json").write_text("{}")
    line = fit_error(capsys, tmp_path / "run", "--server.model.source", str(folder))
    assert "could not load model" in line and "model_type" in line


# ---- dataset folders ------------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    line = fit_error(capsys, tmp_path / "run", "--data.data_dir", str(empty))
    assert "cannot read a dataset" in line and str(empty) in line


def test_dataset_with_the_wrong_columns(tmp_path, capsys):
    import datasets

    folder = tmp_path / "data"
    datasets.Dataset.from_dict({"question": ["q?"], "answer": ["a"]}).save_to_disk(str(folder))
    line = fit_error(capsys, tmp_path / "run", "--data.data_dir", str(folder))
    assert "lacks column(s)" in line and "choices" in line and "answerKey" in line


def test_dataset_with_a_malformed_row(tmp_path, capsys):
    import datasets

    rows = {
        "id": [f"q{i}" for i in range(40)],
        "question": ["2+2?"] * 40,
        "choices": [{"text": ["3", "4"], "label": ["A", "B"]}] * 39 + [{"text": ["3", "4"], "label": ["A"]}],
        "answerKey": ["B"] * 40,
    }
    folder = tmp_path / "data"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    line = fit_error(capsys, tmp_path / "run", "--data.data_dir", str(folder))
    assert "row 39" in line and "malformed" in line


# ---- received payloads ------------------------------------------------------------------------------


def _payload(sender: str = "client_0", rows: int = 6, k: int = 2, vocab: int = 100) -> KnowledgePayload:
    return KnowledgePayload(
        sender=sender,
        round=1,
        vocab_size=vocab,
        sample_index=torch.arange(3),
        losses=torch.ones(3),
        offsets=torch.arange(0, rows + 1, rows // 3),
        token_ids=torch.arange(rows).to(torch.int16),
        topk_ids=torch.arange(rows * k).view(rows, k).remainder(vocab).to(torch.int16),
        topk_logits=torch.zeros(rows, k).half(),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
    )


def _assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "Fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_oversize_payload_is_refused_unread(monkeypatch):
    data = _payload().to_bytes()
    KnowledgePayload.from_bytes(data, max_bytes=len(data))  # at the limit: fine

    def parse(*args):
        raise AssertionError("an oversize payload must be refused before it is parsed")

    monkeypatch.setattr(payload_module, "load_safetensors", parse)
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data, max_bytes=len(data) - 1)
    _assert_one_line(error, f"{len(data):,} bytes", f"{len(data) - 1:,}-byte limit", "MAX_PAYLOAD_BYTES")
    # The default limit is the module constant (looked up at call time, so deployments can set it).
    assert payload_module.MAX_PAYLOAD_BYTES >= 1024**3
    monkeypatch.setattr(payload_module, "MAX_PAYLOAD_BYTES", 100)
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line(error, "100-byte limit")


def test_topk_without_columns_is_rejected():
    payload = _payload(k=0)
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line(error, "top-k has no columns")


class _Party:
    """A stand-in participant whose shared payload a test can spoil."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls
        self.num_public = 3
        self.spoil = None

    def fine_tune(self, round_index):
        return PhaseStats(task_loss=1.0)

    def share_knowledge(self, round_index):
        payload = _payload(self.name)
        if self.spoil:
            self.spoil(payload)
        return payload

    def distill(self, round_index, payloads):
        self.calls.append((self.name, round_index, tuple(payloads)))
        return PhaseStats(task_loss=1.0)

    def evaluate(self):
        return {"eval_accuracy": 0.5}

    def save_adapter(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_model.safetensors").write_bytes(b"weights")

    def cached_public_losses(self):
        return None


def _set(name, index, value):
    def spoil(payload):
        getattr(payload, name)[index] = value

    return spoil


SPOILED = {
    "nan-logits": (_set("topk_logits", (0, 0), float("nan")), "NaN/inf"),
    "inf-loss": (_set("losses", 1, float("inf")), "NaN/inf"),
    "id-out-of-vocab": (_set("topk_ids", (2, 1), 100), "topk_ids fall outside the sender's vocabulary of 100"),
    "wrong-shape": (lambda p: setattr(p, "topk_logits", p.topk_logits[:, :1]), "top-k shapes"),
    "oversize": (lambda p: setattr(p, "token_ids", torch.zeros(4_000_000, dtype=torch.int16)), "limit"),
}


@pytest.fixture
def federation(tmp_path, monkeypatch):
    monkeypatch.setattr(payload_module, "MAX_PAYLOAD_BYTES", 1_000_000)
    config = RunConfig(
        server=PartyConfig(model=ModelSpec("embedded:gemma3-270m")),
        clients=[PartyConfig(model=ModelSpec("embedded:smollm2-135m-instruct")) for _ in range(2)],
    )
    config.federation.evaluate_every_round = False
    calls: list = []
    server, clients = _Party("server", calls), [_Party("client_0", calls), _Party("client_1", calls)]
    trainer = FederatedTrainer(server, clients, config, tmp_path / "run")
    return SimpleNamespace(trainer=trainer, server=server, clients=clients, calls=calls, run_dir=tmp_path / "run")


@pytest.mark.parametrize("spoiled", sorted(SPOILED))
def test_a_bad_client_payload_is_never_distilled(spoiled, federation):
    spoil, needle = SPOILED[spoiled]
    federation.clients[1].spoil = spoil
    with pytest.warns(UserWarning, match="client_1 failed"):
        record = federation.trainer.run_round(1)
    assert needle in record["failed"]["client_1"] and "\n" not in record["failed"]["client_1"]
    # The server distilled from client_0 only, and client_1 got nothing back.
    assert ("server", 1, ("client_0",)) in federation.calls
    assert not [c for c in federation.calls if c[0] == "client_1"]


@pytest.mark.parametrize("spoiled", sorted(SPOILED))
def test_a_bad_server_payload_stops_the_round_with_the_checkpoint_intact(spoiled, federation):
    federation.trainer.run_round(1)
    checkpoint = (federation.run_dir / "checkpoint" / "checkpoint.json").read_bytes()
    summary = (federation.run_dir / "summary.json").read_bytes()
    spoil, needle = SPOILED[spoiled]
    federation.server.spoil = spoil
    federation.calls.clear()
    with pytest.raises(FedMKTError) as error:
        federation.trainer.run_round(2)
    _assert_one_line(error, needle)
    assert not [c for c in federation.calls if c[0].startswith("client")]  # no client distilled from it
    assert (federation.run_dir / "checkpoint" / "checkpoint.json").read_bytes() == checkpoint
    assert (federation.run_dir / "summary.json").read_bytes() == summary
    assert json.loads(checkpoint)["round"] == 1 and not (federation.run_dir / "adapters" / "round_2").exists()
    assert not _temporaries(federation.run_dir)
