"""`fedmkt export --out` and `fit --overwrite` replace only fedmkt's own outputs, never the folder a user works in."""

from __future__ import annotations

import os

import pytest

from fedmkt.cli import main
from fedmkt.files import atomic_write_dir
from fedmkt.output_folders import EXPORT_MARKER


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A user's folder holding their own file and a (fake) run folder, as the current folder."""
    (tmp_path / "notes.txt").write_text("mine")
    run = tmp_path / "runs" / "demo"
    (run / "adapters").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, run


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(capsys, argv, needle):
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedmkt:")]
    assert len(errors) == 1 and needle in errors[0] and "Fix:" in errors[0], errors


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        (".", "current folder or one above it"),
        ("", "--out is empty"),
        ("..", "current folder or one above it"),
        ("runs/demo", "is the run folder"),
        ("runs/demo/adapters", "is the run folder runs/demo or inside it"),
        ("runs/demo/export", "or inside it"),
        ("runs", "holds the run folder"),
        ("notes.txt", "is a file"),
    ],
)
def test_export_refuses_an_out_that_would_replace_the_users_work(workspace, capsys, out, needle):
    root, run = workspace
    before = _tree(root)
    _refused(capsys, ["export", "--run", "runs/demo", "--party", "server", "--out", out], needle)
    assert _tree(root) == before and (root / "notes.txt").read_text() == "mine"


def test_export_refuses_a_non_empty_folder_that_is_no_export(workspace, capsys):
    root, _ = workspace
    (root / "models").mkdir()
    (root / "models" / "weights.bin").write_bytes(b"x")
    _refused(
        capsys, ["export", "--run", "runs/demo", "--party", "server", "--out", "models"], "not an earlier fedmkt export"
    )
    assert (root / "models" / "weights.bin").read_bytes() == b"x"


def test_export_refuses_a_link_to_the_run_folder(workspace, capsys):
    root, _ = workspace
    os.symlink(root / "runs" / "demo", root / "link")
    _refused(capsys, ["export", "--run", "runs/demo", "--party", "server", "--out", "link"], "is the run folder")
    assert (root / "runs" / "demo" / "config.yaml").is_file()


@pytest.mark.parametrize("made", ["missing", "empty", "export"])
def test_export_accepts_a_new_empty_or_earlier_export_folder(workspace, capsys, made):
    """The target check passes (the fake run then fails later, for want of a run config it can read)."""
    root, _ = workspace
    if made != "missing":
        (root / "out").mkdir()
    if made == "export":
        (root / "out" / EXPORT_MARKER).write_text("{}")
        (root / "out" / "adapter_model.safetensors").write_bytes(b"old")
    main(["export", "--run", "runs/demo", "--party", "server", "--out", "out"])
    assert "--out" not in capsys.readouterr().err


def test_replacing_a_folder_keeps_the_old_one_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def failing_second_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder has moved aside; the new one fails to go in
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_replace)
    with pytest.raises(OSError):
        atomic_write_dir(target, lambda folder: (folder / "new.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind


def test_overwrite_removes_nothing_in_a_folder_no_run_used(tmp_path, monkeypatch, capsys):
    """A user's own config.yaml and logs/ in the current folder survive `--run_dir . --overwrite`."""
    (tmp_path / "config.yaml").write_text("my own config\n")
    (tmp_path / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", "tiny", "--logging.wandb", "false", "--run_dir", ".", "--overwrite"]
    _refused(capsys, argv, "no fedmkt run ever used it")
    assert (tmp_path / "config.yaml").read_text() == "my own config\n" and (tmp_path / "logs").is_dir()
