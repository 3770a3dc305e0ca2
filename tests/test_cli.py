"""The `fedmkt` command line: config resolution and one-line errors for bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmkt.cli import main
from fedmkt.config import resolve_config_path, shipped_configs
from fedmkt.errors import FedMKTError

TINY = shipped_configs()["tiny.yaml"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmkt.cli", *args], capture_output=True, text=True, timeout=300)


def test_bare_names_resolve_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_config_path("tiny.yaml")) == TINY
    assert Path(resolve_config_path("tiny")) == TINY
    (tmp_path / "tiny").mkdir()  # a folder of that name (data beside a config) is not a config
    assert Path(resolve_config_path("tiny")) == TINY
    local = tmp_path / "tiny.yaml"
    local.write_text("seed: 1\n")
    assert resolve_config_path("tiny.yaml") == "tiny.yaml"  # an existing path wins over the shipped name


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(FedMKTError, match="heterogeneous.yaml"):
        resolve_config_path("no-such-config")


def _write_config(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # no traceback
    assert "Fix:" in lines[0]
    return lines[0]


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = _write_config(tmp_path, lambda d: d["transfer"].update(topk=4))
    assert "transfer.topk" in _one_line_error(run_cli("fit", "--config", str(path)))


@pytest.mark.slow
def test_missing_model_file_names_the_file(tmp_path):
    path = _write_config(tmp_path, lambda d: d["server"]["model"].update(source=str(tmp_path / "missing.gguf")))
    assert "missing.gguf" in _one_line_error(run_cli("fit", "--config", str(path), "--run_dir", str(tmp_path / "run")))


def test_a_missing_model_names_the_party_whose_source_it_is(tmp_path, capsys):
    argv = [
        "fit",
        "--config",
        "tiny",
        "--clients.1.model.source",
        str(tmp_path / "nope"),
        "--run_dir",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "clients[1].model.source" in error and error.count("\n") == 1


def test_non_positive_top_k_names_the_key(tmp_path):
    assert "transfer.top_k" in _one_line_error(run_cli("fit", "--config", "tiny", "--transfer.top_k", "0"))


@pytest.mark.slow
def test_task_with_zero_samples_is_reported(tmp_path):
    import datasets

    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"id": [], "question": [], "choices": [], "answerKey": []}).save_to_disk(str(empty))
    line = _one_line_error(
        run_cli("fit", "--config", "tiny", "--data.data_dir", str(empty), "--run_dir", str(tmp_path / "run"))
    )
    assert "empty" in line.lower() or "0 " in line


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(FedMKTError):
        main(["fit", "--config", "tiny", "--transfer.top_k", "-1", "--debug"])


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    result = run_cli("fit", "--config", "tiny", "--transfer.top_k", "5", "--print_config")
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert yaml.safe_load(result.stdout)["transfer"]["top_k"] == 5
    again = run_cli("fit", "--config", str(printed), "--print_config")
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == yaml.safe_load(result.stdout)


def test_a_config_for_gpu_machines_and_hub_models_prints_here_with_the_checks_left_for_there(monkeypatch, capsys):
    # one_to_one.yaml: LLaMA-2 models from the hub on GPUs; this machine has neither.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("fedmkt.config._cuda_available", lambda: False)
    with pytest.raises(SystemExit) as printed:  # jsonargparse exits 0 after printing
        main(["fit", "--config", "one_to_one", "--print_config"])
    assert printed.value.code in (0, None)
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["server"]["model"]["source"] == "meta-llama/Llama-2-7b-hf"
    notes = [line for line in err.splitlines() if line.startswith("fedmkt: checked where the run happens")]
    assert any("no usable GPU" in line for line in notes)
    assert any("server's tokenizer is not readable here" in line for line in notes)
    # a value wrong on any machine still stops the print
    assert main(["fit", "--config", "one_to_one", "--transfer.top_k", "0", "--print_config"]) == 2


def test_map_vocab_writes_every_source_token(tmp_path, capsys):
    from fedmkt.config import ModelSpec
    from fedmkt.models import load_tokenizer

    out = tmp_path / "smollm2_to_gemma3.json"
    assert (
        main(
            ["map-vocab", "--src", "embedded:smollm2-135m-instruct", "--dst", "embedded:gemma3-270m", "--out", str(out)]
        )
        == 0
    )
    mapping = __import__("json").loads(out.read_text())
    source = load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"))
    target_vocab = set(load_tokenizer(ModelSpec("embedded:gemma3-270m")).get_vocab())
    assert len(mapping) == len(source.get_vocab())
    # Special tokens with no identically spelled twin map nowhere (null); everything else maps.
    unmapped = {token for token, target in mapping.items() if target is None}
    assert unmapped == set(source.all_special_tokens) | {
        t.content for t in source.added_tokens_decoder.values() if t.special
    }
    assert set(mapping.values()) - {None} <= target_vocab
    assert mapping["Ġthe"] == "▁the"  # word-boundary markers normalised before matching
    assert mapping[","] == ","  # Gemma's own comma, not its byte fallback <0x2C>


def test_align_text_json_rows(capsys):
    text = "Planets orbit the sun."
    argv = [
        "align-text",
        "--src",
        "embedded:smollm2-135m-instruct",
        "--dst",
        "embedded:gemma3-270m",
        "--text",
        text,
        "--json",
    ]
    assert main(argv) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    assert all(
        list(row) == ["dst_index", "dst_token", "dst_span", "src_index", "src_token", "src_span", "target"]
        for row in rows
    )
    assert [row["dst_token"] for row in rows] == ["<bos>", "Plan", "ets", "▁orbit", "▁the", "▁sun", "."]
    bos, plan = rows[0], rows[1]
    # Gemma's <bos> has no SmolLM2 counterpart: unmatched, one-hot on its next token.
    assert (
        bos["src_index"] is None and bos["src_span"] is None and bos["target"] == "Plan" and bos["dst_span"] == [0, 0]
    )
    assert (
        plan["src_index"] == 0
        and plan["src_token"] == "Plan"
        and plan["src_span"] == [0, 4]
        and plan["target"] == "Plan"
    )
    orbit = rows[3]
    assert (
        orbit["src_token"] == "Ġorbit" and orbit["target"] == "▁orbit" and text[slice(*orbit["dst_span"])] == " orbit"
    )


def test_align_text_dtw_table(capsys):
    argv = [
        "align-text",
        "--src",
        "embedded:gemma3-270m",
        "--dst",
        "embedded:smollm2-135m-instruct",
        "--text",
        "Planets orbit the sun.",
        "--sequence_alignment",
        "dtw",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["dst", "dst_token", "dst_span", "src", "src_token", "src_span", "target"]
    assert "receiver positions take the teacher's distribution" in out.splitlines()[-1]


def test_align_text_rejects_an_empty_text(capsys):
    assert main(["align-text", "--src", "embedded:gemma3-270m", "--dst", "embedded:gemma3-270m", "--text", ""]) != 0
    assert "--text is empty" in capsys.readouterr().err


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedmkt {version('fedmkt')}"


def test_one_key_of_one_client_is_set_on_the_command_line_and_every_other_key_kept():
    from fedmkt.config import parse_run_config

    base = parse_run_config(["--config", "tiny"])
    changed = parse_run_config(["--config", "tiny", "--clients.1.optimizer.lr", "1e-2", "--clients.0.batch_size=2"])
    assert changed.clients[1].optimizer.lr == 0.01 and changed.clients[0].batch_size == 2
    assert changed.clients[0].optimizer == base.clients[0].optimizer and changed.server == base.server
    assert [c.model for c in changed.clients] == [c.model for c in base.clients]  # random_init kept


@pytest.mark.parametrize(
    "arguments, needle",
    [
        (["--clients.5.optimizer.lr", "1"], "the config has 2 client(s)"),
        (["--clients.0.optimizer.nope", "1"], "a client has no key 'nope'"),
        (["--clients.0.optimizer.lr", "fast"], "is 'fast', not a number"),
    ],
)
def test_a_wrong_client_key_is_one_line(arguments, needle, capsys):
    assert main(["fit", "--config", "tiny", *arguments, "--print_config"]) == 2
    error = capsys.readouterr().err
    assert needle in error and error.count("\n") == 1


def test_a_whole_client_list_that_drops_keys_says_which(capsys):
    source = '{"model": {"source": "embedded:smollm2-135m-instruct"}}'
    with pytest.raises(SystemExit) as printed:  # --print_config prints and exits, as jsonargparse does
        main(["fit", "--config", "tiny", "--clients", f"[{source}, {source}]", "--print_config"])
    assert printed.value.code == 0
    error = capsys.readouterr().err
    assert "clients[0].model.random_init" in error and "go back to their defaults" in error
    assert "--clients.N.KEY VALUE" in error


def test_fit_help_offers_no_key_the_server_never_reads(capsys):
    from fedmkt.config import parse_run_config

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--server.eval_batch_size" in text and "--server.local_epochs" in text
    assert not re.search(r"--server\.(data|eval)\b(?!_)", text)
    # A saved config holding them as null (every run's config.yaml so far) still parses.
    assert parse_run_config(["--config", "tiny", "--server.data", "null", "--server.eval", "null"]).server.data is None
