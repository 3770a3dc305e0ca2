"""A run folder belongs to one run; bad files, bad values and unreachable hubs are one line.

End to end on tiny.yaml (real tokenizers, random-init models). One finished 1-round run is made
once per module and copied into each test that needs a folder holding a run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from filelock import FileLock

from fedmkt.cli import main
from fedmkt.errors import FedMKTError
from fedmkt.federation.participant import Participant
from fedmkt.files import atomic_write_dir

FAST = [
    "--config",
    "tiny",
    "--federation.evaluate_before",
    "false",
    "--federation.evaluate_every_round",
    "false",
    "--logging.wandb",
    "false",
    "--data.pool_size",
    "6",
    "--data.max_length",
    "48",
]


def _error_line(capsys, code: int = 2) -> str:
    """Exactly one `fedmkt:` line on stderr, no traceback; returns it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fedmkt:")]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["fit", *FAST, "--federation.rounds", "1", "--run_dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def copy_of_finished(finished, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


# ---- 1. a run folder belongs to one run -----------------------------------------------------------


def test_a_second_run_on_a_locked_run_dir_is_refused_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FileLock(str(run_dir / "run.lock")):  # as a first run holds it
        assert main(["fit", *FAST, "--run_dir", str(run_dir)]) == 2
    line = _error_line(capsys)
    assert "in use by another fedmkt run" in line and "Fix:" in line
    assert [p.name for p in run_dir.iterdir()] == ["run.lock"]


def test_a_folder_holding_a_run_is_refused_and_left_byte_for_byte(copy_of_finished, capsys):
    before = _snapshot(copy_of_finished)
    assert main(["fit", *FAST, "--federation.rounds", "1", "--run_dir", str(copy_of_finished)]) == 2
    line = _error_line(capsys)
    for needle in ("already holds a run", f"--resume {copy_of_finished}", "--overwrite"):
        assert needle in line, (needle, line)
    assert _snapshot(copy_of_finished) == before


def test_overwrite_replaces_the_whole_previous_run(copy_of_finished, capsys):
    stale = copy_of_finished / "adapters" / "round_2" / "server"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"from another run")
    (copy_of_finished / "logs_resumed_2").mkdir()
    (copy_of_finished / "notes.txt").write_text("mine")  # not a run output: kept
    assert main(["fit", *FAST, "--federation.rounds", "1", "--run_dir", str(copy_of_finished), "--overwrite"]) == 0
    assert not (copy_of_finished / "adapters" / "round_2").exists()
    assert not (copy_of_finished / "logs_resumed_2").exists()
    assert (copy_of_finished / "notes.txt").read_text() == "mine"
    summary = json.loads((copy_of_finished / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1]


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_config_error_on_rerun_leaves_the_finished_run_untouched(copy_of_finished, capsys, flag):
    before = _snapshot(copy_of_finished)
    args = ["fit", *FAST, "--run_dir", str(copy_of_finished), "--server.trainer.precision", "banana", *flag]
    assert main(args) == 2
    assert "server.trainer.precision" in _error_line(capsys)
    assert _snapshot(copy_of_finished) == before  # `--config RUN/config.yaml --resume RUN` still works


def test_a_refused_resume_leaves_no_logs_resumed_folder(copy_of_finished, capsys):
    before = sorted(p.name for p in copy_of_finished.iterdir())
    args = ["fit", *FAST, "--federation.rounds", "2", "--transfer.top_k", "4", "--resume", str(copy_of_finished)]
    assert main(args) == 2
    assert "transfer.top_k" in _error_line(capsys)
    assert sorted(p.name for p in copy_of_finished.iterdir()) == before


def test_resume_and_overwrite_together_are_refused(copy_of_finished, capsys):
    assert main(["fit", *FAST, "--resume", str(copy_of_finished), "--overwrite"]) == 2
    assert "--overwrite" in _error_line(capsys)


# ---- 3. every value checked before the first model trains --------------------------------------


def _tiny_with(tmp_path: Path, edit) -> str:
    """tiny.yaml with `edit(dict)` applied, written to a file."""
    import yaml

    from fedmkt.config import shipped_configs

    data = yaml.safe_load(shipped_configs()["tiny.yaml"].read_text())
    edit(data)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["server"]["trainer"].update(precision="banana"), "server.trainer.precision"),
        (lambda d: d["clients"][1]["trainer"].update(precision="bf17-mixed"), "clients[1].trainer.precision"),
        (lambda d: d["transfer"].update(top_k=300000), "transfer.top_k"),
        (lambda d: d["clients"][0].update(lora={"dropout": 1.5}), "clients[0].lora.dropout"),
        (lambda d: d["server"]["trainer"].update(accelerator="gpu"), "server.trainer.accelerator"),
    ],
)
def test_bad_values_are_named_at_start_up_before_anything_is_written(tmp_path, capsys, monkeypatch, edit, key):
    import fedmkt.config

    monkeypatch.setattr(fedmkt.config, "_cuda_available", lambda: False)  # the same on a machine with a GPU
    trained = []
    monkeypatch.setattr(Participant, "fine_tune", lambda self, r: trained.append(self.name))
    run_dir = tmp_path / "run"
    assert main(["fit", *FAST, "--config", _tiny_with(tmp_path, edit), "--run_dir", str(run_dir)]) == 2
    line = _error_line(capsys)
    assert key in line and "Fix:" in line, line
    assert not trained and not run_dir.exists()


def test_print_config_runs_the_same_validation(capsys):
    assert main(["fit", "--config", "tiny", "--transfer.top_k", "0", "--print_config"]) == 2
    assert "transfer.top_k" in _error_line(capsys)
    assert main(["fit", "--config", "tiny", "--transfer.top_k", "300000", "--print_config"]) == 2
    assert "vocabulary" in _error_line(capsys)
    assert capsys.readouterr().out == ""


def test_every_client_failing_alike_in_round_1_is_a_config_error(tmp_path, capsys, monkeypatch):
    def fails(self, round_index):
        raise ValueError(f"{self.name}: cannot use this setting")

    monkeypatch.setattr(Participant, "fine_tune", fails)
    run_dir = tmp_path / "run"
    assert main(["fit", *FAST, "--run_dir", str(run_dir)]) == 2
    line = _error_line(capsys)
    assert "every client failed the same way" in line and "configuration error" in line
    assert "cannot use this setting" in line and "repair those clients" not in line
    assert not (run_dir / "checkpoint").exists()


# ---- 4. bad files are one line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"seed: 42\nrun_dir: caf\xe9\n", "not UTF-8"),
        (b"\x00\x01\x02GGUF binary", "not UTF-8"),
        (b"seed: 42\nserver: {model: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_an_unreadable_yaml_names_the_file(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main(["fit", "--config", str(path)]) == 2
    line = _error_line(capsys)
    assert needle in line and str(path) in line and "Fix:" in line, line


@pytest.mark.parametrize("content", [b"", b'{"round": 1, "summ'])
def test_an_empty_or_truncated_checkpoint_is_one_line(copy_of_finished, capsys, content):
    (copy_of_finished / "checkpoint" / "checkpoint.json").write_bytes(content)
    assert main(["fit", *FAST, "--federation.rounds", "2", "--resume", str(copy_of_finished)]) == 2
    line = _error_line(capsys)
    assert "checkpoint.json is empty or damaged" in line and "--overwrite" in line


def test_a_truncated_adapter_at_resume_is_one_line(copy_of_finished, capsys):
    weights = copy_of_finished / "adapters" / "round_1" / "client_1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["fit", *FAST, "--federation.rounds", "2", "--resume", str(copy_of_finished)]) == 2
    line = _error_line(capsys)
    assert "client_1" in line and "round 1 adapter" in line and "Fix:" in line
    assert not list(copy_of_finished.glob("logs_resumed_*"))


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: use /sys)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    folder = Path("/sys/fedmkt-test")
    try:
        folder.mkdir()
    except OSError:
        return folder
    folder.rmdir()
    pytest.skip("no unwritable folder on this machine")


def test_a_read_only_run_dir_is_one_line(tmp_path, capsys):
    run_dir = _unwritable_folder(tmp_path) / "run"
    assert main(["fit", *FAST, "--run_dir", str(run_dir)]) == 2
    line = _error_line(capsys)
    assert "cannot write to run_dir" in line and "Fix:" in line


def test_map_vocab_unwritable_out_and_bad_sources_name_its_flags(tmp_path, capsys):
    out = _unwritable_folder(tmp_path) / "map.json"
    args = [
        "map-vocab",
        "--src",
        "embedded:smollm2-135m-instruct",
        "--dst",
        "embedded:smollm2-135m-instruct",
        "--out",
        str(out),
    ]
    assert main(args) == 2
    assert "--out" in _error_line(capsys)
    assert (
        main(
            [
                "map-vocab",
                "--src",
                str(tmp_path / "nope.gguf"),
                "--dst",
                "embedded:gemma3-270m",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 2
    )
    line = _error_line(capsys)
    assert "--src" in line and "model.source" not in line
    assert (
        main(
            ["map-vocab", "--src", "embedded:gemma3-270m", "--dst", "embedded:nope", "--out", str(tmp_path / "m.json")]
        )
        == 2
    )
    line = _error_line(capsys)
    assert "--dst" in line and "model.source" not in line


def test_evaluate_with_another_partys_adapter_is_one_line(finished, capsys):
    adapter = finished / "adapters" / "round_1" / "server"
    args = ["evaluate", *FAST, "--party", "client_0", "--adapter", str(adapter)]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "does not fit client_0" in line and "Fix:" in line


def test_a_folder_written_atomically_is_whole_or_absent(tmp_path):
    target = tmp_path / "tokenizers" / "server"

    def disk_full(folder: Path) -> None:
        (folder / "tokenizer.json").write_text('{"half": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_dir(target, disk_full)
    assert list((tmp_path / "tokenizers").iterdir()) == []  # no target, no temporary
    atomic_write_dir(target, lambda folder: (folder / "tokenizer.json").write_text("{}"))
    with pytest.raises(OSError):
        atomic_write_dir(target, disk_full)
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["server"]
    assert (target / "tokenizer.json").read_text() == "{}"  # the previous complete version


# ---- 5. hub names without network -----------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint nothing listens on, as on a machine without network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("source", ["facebook/opt-125m", "models/my-llama"])
def test_a_hub_name_without_network_fails_in_seconds_naming_the_fixes(no_hub, source):
    from fedmkt.models import resolve_source

    started = time.monotonic()
    with pytest.raises(FedMKTError) as error:
        resolve_source(source)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message
    for needle in (
        f"`{source}` does not exist locally",
        "cannot be reached",
        "local model folder",
        "embedded:",
        "HF_HUB_OFFLINE=1",
    ):
        assert needle in message, (needle, message)


def test_hf_hub_offline_without_a_cached_copy_is_named(monkeypatch):
    from huggingface_hub import constants

    from fedmkt.models import resolve_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FedMKTError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        resolve_source("facebook/opt-125m-not-cached")


# ---- 6. small ones --------------------------------------------------------------------------------


def test_resume_on_a_finished_run_has_nothing_left_to_do(copy_of_finished, capsys):
    before = _snapshot(copy_of_finished)
    assert main(["fit", *FAST, "--federation.rounds", "1", "--resume", str(copy_of_finished)]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert _snapshot(copy_of_finished) == before


def test_resume_on_a_file_says_it_is_not_a_folder(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text("{}")
    assert main(["fit", *FAST, "--resume", str(path)]) == 2
    assert "is a file, not a folder" in _error_line(capsys)


# ---- the Flower backend: fit() dispatches, and a submission claims the folder as fit does -------


def test_fit_with_the_flower_backend_submits_instead_of_running_in_process(tmp_path, monkeypatch):
    from fedmkt.config import parse_run_config
    from fedmkt.federation.flower import submit as submit_module
    from fedmkt.run import fit

    sent = {}

    def fake_submit(config, resolved_config, resume=False, overwrite=False, **_):
        sent.update(config=config, text=resolved_config, resume=resume, overwrite=overwrite)
        return {"submitted": True}

    monkeypatch.setattr(submit_module, "submit", fake_submit)
    monkeypatch.setattr(Participant, "fine_tune", lambda *a: pytest.fail("a party trained in this process"))
    config = parse_run_config(["--config", "tiny", "--federation.backend", "flower", "--run_dir", "rel/run"])
    monkeypatch.chdir(tmp_path)
    assert fit(config, overwrite=True) == {"submitted": True}
    assert sent["overwrite"] and not sent["resume"]
    assert sent["config"].run_dir == str(tmp_path / "rel" / "run")  # absolute: the ServerApp runs elsewhere
    assert "backend: flower" in sent["text"]  # a script's config reaches the run as YAML text


@pytest.fixture
def superlink_stub(monkeypatch):
    """A submit that finds a SuperLink and whose run "finishes" by writing a summary, without Flower."""
    from fedmkt.federation.flower import submit as submit_module

    runs = []

    def finished(flwr, config, run_dir, resolved_config, stream, resume, control_token=None):
        runs.append(run_dir)
        (run_dir / "summary.json").write_text(json.dumps({"rounds": []}))
        return 1, "finished:completed", ""

    monkeypatch.setattr(submit_module, "_listening", lambda address: True)
    monkeypatch.setattr(submit_module, "flwr_executable", lambda: "flwr")
    monkeypatch.setattr(submit_module, "_run_on_superlink", finished)
    return submit_module, runs


def test_a_flower_submission_takes_the_run_lock_and_honours_overwrite(copy_of_finished, superlink_stub):
    from fedmkt.config import parse_run_config

    submit_module, runs = superlink_stub
    config = parse_run_config([*FAST, "--federation.backend", "flower", "--run_dir", str(copy_of_finished)])
    before = {p.name: p.stat().st_mtime_ns for p in copy_of_finished.iterdir()}
    with pytest.raises(FedMKTError, match="already holds a run"):
        submit_module.submit(config, resolved_config="seed: 1\n")
    assert {p.name: p.stat().st_mtime_ns for p in copy_of_finished.iterdir()} == before and runs == []
    holder = FileLock(str(copy_of_finished / "run.lock"))
    holder.acquire()
    try:
        with pytest.raises(FedMKTError, match="in use by another fedmkt run"):
            submit_module.submit(config, resolved_config="seed: 1\n", overwrite=True)
    finally:
        holder.release()
    submit_module.submit(config, resolved_config="seed: 1\n", overwrite=True)
    assert runs == [copy_of_finished] and not (copy_of_finished / "adapters").exists()  # replaced, as fit does


def test_resume_without_a_config_reads_the_runs_own(copy_of_finished, capsys):
    before = _snapshot(copy_of_finished)
    assert main(["fit", "--resume", str(copy_of_finished)]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert _snapshot(copy_of_finished) == before


def test_fit_without_a_config_or_a_run_to_resume_says_what_to_pass(tmp_path, capsys):
    assert main(["fit"]) == 2
    line = _error_line(capsys)
    assert "pass --config (e.g. --config demo.yaml)" in line
    assert main(["fit", "--resume", str(tmp_path)]) == 2
    assert "holds no config.yaml" in _error_line(capsys)


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_with_overwrite(copy_of_finished, capsys):
    """The rerun's advice and --resume's agree: no checkpoint, so --overwrite (never --resume)."""
    shutil.rmtree(copy_of_finished / "checkpoint")
    assert main(["fit", *FAST, "--federation.rounds", "1", "--run_dir", str(copy_of_finished)]) == 2
    rerun = _error_line(capsys)
    assert "before its first round checkpoint" in rerun and "--overwrite" in rerun and "--resume " not in rerun
    assert main(["fit", *FAST, "--federation.rounds", "1", "--resume", str(copy_of_finished)]) == 2
    assert "--overwrite" in _error_line(capsys)
