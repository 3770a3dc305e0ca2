"""benchmarks/reproduce.py: paired intervals, the report's schema, and a grid that resumes instead of rerunning."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmkt.config import run_config_from_text
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import wilson_interval

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap_degenerate_cases(reproduce):
    assert reproduce.paired_bootstrap("1010", "1010") == (0.0, [0.0, 0.0])
    assert reproduce.paired_bootstrap("1111", "0000") == (1.0, [1.0, 1.0])
    with pytest.raises(ValueError, match="equally long"):
        reproduce.paired_bootstrap("10", "100")


def test_paired_bootstrap_matches_the_normal_approximation(reproduce):
    # Oracle: for n = 2000 the bootstrap percentile interval of a mean difference is close to
    # mean +- 1.96 * sd / sqrt(n) of the per-question differences.
    rng = random.Random(3)
    a = "".join("1" if rng.random() < 0.62 else "0" for _ in range(2000))
    b = "".join(bit if rng.random() < 0.8 else ("0" if bit == "1" else "1") for bit in a)  # correlated with a
    deltas = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(deltas) / len(deltas)
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    half = 1.959964 * sd / math.sqrt(len(deltas))
    diff, (low, high) = reproduce.paired_bootstrap(a, b)
    assert diff == pytest.approx(mean)
    assert low == pytest.approx(mean - half, abs=0.004) and high == pytest.approx(mean + half, abs=0.004)


def _summary(mode: str, records: dict[str, str], data: dict | None = None, rounds: int = 2) -> dict:
    """A summary.json shaped as a run writes it, with per-question records for each scored party."""

    def entry(correct: str) -> dict:
        n, right = len(correct), correct.count("1")
        interval = list(wilson_interval(right, n))
        return {"eval_accuracy": right / n, "eval_n": n, "eval_accuracy_ci": interval, "eval_correct": correct}

    config = {"seed": 1, "data": data or {"task": "arc_easy", "eval_size": 8}, "clients": [{}, {}]}
    if mode == "zero_shot":
        return {"config": config, "zero_shot": {p: entry(c) for p, c in records.items()}, "rounds": []}
    last = {p: entry(c) for p, c in records.items()}
    history = [{"round": r, "parties": {p: {} for p in records}} for r in range(1, rounds)]
    return {"config": config, "zero_shot": {}, "rounds": [*history, {"round": rounds, "parties": last}]}


def test_assemble_fills_the_schema_and_marks_untrained_parties(reproduce):
    runs = {
        "arc_easy": {
            "zero_shot": _summary("zero_shot", {"server": "11000000", "client_0": "10000000", "client_1": "10000000"}),
            "fedmkt": _summary("fedmkt", {"server": "11110000", "client_0": "11100000", "client_1": "11000000"}),
            "standalone": _summary("standalone", {"client_0": "11000000", "client_1": "11000000"}),
            "centralized": _summary("centralized", {"server": "11111000"}),
        }
    }
    result = reproduce.assemble(runs)["arc_easy"]
    assert result["n_eval"] == 8
    assert sorted(result["missing"]) == ["fedmkt_no_kd", "llm2slm"]
    server, client = result["parties"]["server"], result["parties"]["client_0"]
    assert server["fedmkt"]["acc"] == 0.5 and server["zero_shot"]["acc"] == 0.25
    low, high = server["fedmkt"]["ci"]
    assert low < 0.5 < high
    # The server has no private data: its standalone cell is its zero-shot model, marked as such.
    assert server["standalone"] == server["zero_shot"] | {"same_as": "zero_shot"}
    assert client["centralized"]["same_as"] == "zero_shot" and "same_as" not in client["standalone"]
    diffs = result["differences"]
    # Every question client_0 gains over standalone is one right answer more: 3/8 - 2/8.
    assert diffs["client_0"]["fedmkt-standalone"]["diff"] == pytest.approx(1 / 8)
    assert diffs["client_0"]["fedmkt-zero_shot"]["diff"] == pytest.approx(2 / 8)
    assert diffs["server"]["fedmkt-centralized"]["diff"] == pytest.approx(-1 / 8)
    assert set(diffs["client_1"]) == {
        "fedmkt-standalone",
        "fedmkt-zero_shot",
        "fedmkt-centralized",
        "standalone-zero_shot",
    }
    assert diffs["client_0"]["standalone-zero_shot"]["diff"] == pytest.approx(1 / 8)
    assert "standalone-zero_shot" not in diffs["server"]  # the server's standalone cell is its zero-shot model
    json.dumps(result)  # the report is plain JSON (no per-question records left in it)
    assert "correct" not in server["fedmkt"]


def test_assemble_reports_fedmkt_after_every_round_against_zero_shot(reproduce):
    zero_shot = _summary("zero_shot", {"server": "11000000", "client_0": "10000000", "client_1": "10000000"})
    fedmkt = _summary("fedmkt", {"server": "11100000", "client_0": "11110000", "client_1": "10000000"}, rounds=2)
    first = _summary("fedmkt", {"server": "11111000", "client_0": "10000000"}, rounds=1)["rounds"][0]
    fedmkt["rounds"][0] = first  # round 1 scored the server and client_0 only
    rows = reproduce.assemble({"arc_easy": {"zero_shot": zero_shot, "fedmkt": fedmkt}})["arc_easy"]["fedmkt_per_round"]
    assert [row["round"] for row in rows["server"]] == [1, 2]
    assert [row["round"] for row in rows["client_1"]] == [2]
    # Counted by hand: the server gets 5, then 3, of 8 right against zero-shot's 2.
    assert [row["acc"] for row in rows["server"]] == [5 / 8, 3 / 8]
    assert [row["minus_zero_shot"]["diff"] for row in rows["server"]] == pytest.approx([3 / 8, 1 / 8])
    assert rows["client_0"][0]["minus_zero_shot"] == {"diff": 0.0, "ci": [0.0, 0.0]}
    low, high = rows["server"][0]["ci"]
    assert low < 5 / 8 < high
    assert "correct" not in rows["server"][0]
    assert reproduce.assemble({"arc_easy": {"zero_shot": zero_shot}})["arc_easy"]["fedmkt_per_round"] == {}


def test_paper_shape_verdicts_follow_the_intervals(reproduce):
    def item(low, high):
        return {"diff": (low + high) / 2, "ci": [low, high]}

    differences = {
        "server": {"fedmkt-zero_shot": item(-0.01, 0.03), "fedmkt-centralized": item(-0.02, 0.01)},
        "client_0": {
            "fedmkt-standalone": item(0.01, 0.05),
            "standalone-zero_shot": item(0.05, 0.10),
            "fedmkt-fedmkt_no_kd": item(-0.02, 0.02),
        },
        "client_1": {"fedmkt-standalone": item(-0.06, -0.01), "fedmkt-fedmkt_no_kd": item(0.005, 0.03)},
    }
    verdicts = {
        c["claim"]: c["verdict"] for c in reproduce.paper_shape(differences, ["server", "client_0", "client_1"])
    }
    assert verdicts["client_0: FedMKT > Standalone"] == "holds"
    assert verdicts["client_0: Standalone > Zero-Shot"] == "holds"
    assert verdicts["client_1: FedMKT > Standalone"] == "contradicted"
    assert verdicts["client_1: Standalone > Zero-Shot"] == "not measured"
    assert verdicts["server: FedMKT > Zero-Shot"] == "not shown"  # 0 lies inside [-1, +3] points
    assert verdicts["server: FedMKT close to Centralized (at most 3 points below)"] == "holds"  # -2 > -3
    assert verdicts["FedMKT > FedMKT with lambda = 1 for at least one party (the KD term's own gain)"] == "holds"
    far_below = {"server": {"fedmkt-centralized": item(-0.08, -0.04)}}
    claims = {c["claim"]: c["verdict"] for c in reproduce.paper_shape(far_below, ["server", "client_0"])}
    assert claims["server: FedMKT close to Centralized (at most 3 points below)"] == "contradicted"
    assert claims["FedMKT > FedMKT with lambda = 1 for at least one party (the KD term's own gain)"] == "not measured"


def test_assemble_refuses_runs_on_different_questions(reproduce):
    runs = {
        "arc_easy": {
            "zero_shot": _summary("zero_shot", {"server": "1100", "client_0": "1000", "client_1": "1000"}),
            "fedmkt": _summary("fedmkt", {"server": "1111", "client_0": "1110", "client_1": "1100"}, {"eval_size": 5}),
        }
    }
    with pytest.raises(SystemExit, match="differ in seed or data"):
        reproduce.assemble(runs)


def test_assemble_pairs_runs_whose_training_pools_differ(reproduce):
    """A public-size try reuses the zero-shot run: the pool does not change the held-out questions."""
    held_out = {"task": "arc_easy", "eval_size": 4, "max_length": 128}
    runs = {
        "arc_easy": {
            "zero_shot": _summary("zero_shot", {"server": "1100"}, {**held_out, "pool_size": 900}),
            "fedmkt": _summary("fedmkt", {"server": "1111"}, {**held_out, "pool_size": 1500, "public_size": 900}),
        }
    }
    assert reproduce.assemble(runs)["arc_easy"]["differences"]["server"]["fedmkt-zero_shot"]["diff"] == 0.5
    runs["arc_easy"]["fedmkt"]["config"]["data"]["max_length"] = 256  # scored on other tokens: not paired
    with pytest.raises(SystemExit, match="differ in seed or data"):
        reproduce.assemble(runs)


def test_mode_arguments_turn_one_config_into_each_mode(reproduce, tmp_path):
    scale = {"eval_size": 12, "part_size": 8, "rounds": 2}
    configs = {m: reproduce.grid_config("tiny", "arc_easy", m, scale, tmp_path, []) for m in reproduce.MODES}
    assert configs["fedmkt_no_kd"].transfer.ce_weight == 1.0 and configs["fedmkt"].transfer.ce_weight == 0.9
    assert configs["fedmkt_no_kd"].federation.mode == "fedmkt"
    assert configs["fedmkt"].federation.evaluate_every_round and not configs["fedmkt"].federation.evaluate_before
    for mode in ("standalone", "centralized", "fedmkt_no_kd", "llm2slm"):
        federation = configs[mode].federation
        assert (federation.evaluate_before, federation.evaluate_every_round, federation.evaluate_final) == (
            False,
            False,
            True,
        )
    assert configs["zero_shot"].federation.evaluate_before
    assert {c.data.pool_size for c in configs.values()} == {24} and {c.data.eval_size for c in configs.values()} == {12}
    hashes = {reproduce.settings_hash(c) for c in configs.values()}
    assert len(hashes) == len(reproduce.MODES)
    moved = reproduce.grid_config("tiny", "arc_easy", "fedmkt", scale, tmp_path / "elsewhere", [])
    assert reproduce.settings_hash(moved) == reproduce.settings_hash(configs["fedmkt"])  # run_dir is not a setting
    assert len({c.run_dir for c in configs.values()}) == len(reproduce.MODES)


@pytest.mark.parametrize(
    "override, changed",
    [
        ("transfer.kd_positions=answer", {"fedmkt", "llm2slm"}),
        ("transfer.temperature=2.0", {"fedmkt", "llm2slm"}),
        ("transfer.ce_weight=0.5", {"fedmkt", "llm2slm"}),  # the lambda = 1 control stays at 1
        ("privacy.logit_noise=0.5", {"fedmkt", "fedmkt_no_kd", "llm2slm"}),
        ("server.optimizer.lr=0.0007", {"fedmkt", "fedmkt_no_kd", "centralized"}),
        ("server.distill_epochs=2", {"fedmkt", "fedmkt_no_kd"}),
        ("server.local_epochs=2", {"fedmkt", "fedmkt_no_kd", "centralized"}),
        ("federation.rounds=4", {"standalone", "fedmkt", "fedmkt_no_kd", "centralized", "llm2slm"}),
        ("clients.1.optimizer.lr=0.0001", {"standalone", "fedmkt", "fedmkt_no_kd", "llm2slm"}),
        ("data.pool_size=30", {"standalone", "fedmkt", "centralized", "fedmkt_no_kd", "llm2slm"}),
        ("data.public_size=12", {"standalone", "fedmkt", "centralized", "fedmkt_no_kd", "llm2slm"}),
    ],
)
def test_a_try_changes_the_settings_hash_only_of_modes_that_read_it(reproduce, tmp_path, override, changed):
    """A tuning try reruns exactly the modes whose results its changed key can move."""
    scale = {"eval_size": 12, "part_size": 8, "rounds": 2}
    for mode in reproduce.MODES:
        base = reproduce.grid_config("tiny", "arc_easy", mode, scale, tmp_path, [])
        tried = reproduce.grid_config("tiny", "arc_easy", mode, scale, tmp_path, [override])
        moved = reproduce.settings_hash(tried) != reproduce.settings_hash(base)
        assert moved == (mode in changed), (override, mode)


def test_every_recorded_run_keeps_the_hash_it_was_recorded_under(reproduce):
    """Keys added to the config later (at their null default) must not orphan the recorded grid."""
    records = sorted((Path(reproduce.__file__).parent / "results" / "reproduction" / "runs").glob("*.json"))
    assert len(records) > 20
    for record in records:
        summary = json.loads(record.read_text())
        # Parsed again today, the config holds every key the code now has.
        config = run_config_from_text(yaml.safe_dump(reproduce.as_run_then(summary["config"])))
        objective = summary.get("kd_objective")  # None: recorded before the KD weighting was stored
        score = summary.get("selection_score")  # None: recorded when DualMinCE scored the answer alone
        assert record.stem.rsplit("-", 1)[1] == reproduce.settings_hash(config, objective, score), record.name
        if reproduce.distills(config) and objective is None:  # an older weighting is never reused today
            assert reproduce.settings_hash(config) != reproduce.settings_hash(config, objective, score)
        if reproduce.selects(config) and score is None:  # nor an older selection score
            assert reproduce.settings_hash(config) != reproduce.settings_hash(config, objective, score)


def test_a_client_override_sets_that_client_only_and_names_a_wrong_index(reproduce, tmp_path):
    scale = {"eval_size": 12, "part_size": 8, "rounds": 2}
    base = reproduce.grid_config("tiny", "arc_easy", "standalone", scale, tmp_path, [])
    tried = reproduce.grid_config("tiny", "arc_easy", "standalone", scale, tmp_path, ["clients.1.optimizer.lr=1e-4"])
    assert tried.clients[1].optimizer.lr == 1e-4
    assert tried.clients[0] == base.clients[0] and tried.server == base.server
    assert tried.clients[1].model == base.clients[1].model and tried.clients[1].lora == base.clients[1].lora
    with pytest.raises(FedMKTError, match=r"clients\.7\.optimizer\.lr: the config has 2 client\(s\)"):
        reproduce.grid_config("tiny", "arc_easy", "standalone", scale, tmp_path, ["clients.7.optimizer.lr=1e-4"])
    with pytest.raises(FedMKTError, match="no group 'optimiser'"):
        reproduce.grid_config("tiny", "arc_easy", "standalone", scale, tmp_path, ["clients.0.optimiser.lr=1e-4"])


@pytest.mark.slow
def test_grid_records_reuses_and_resumes(reproduce, tmp_path, monkeypatch):
    """A finished cell is reused without running; a cell with a round checkpoint resumes from it."""
    out, record = tmp_path / "runs", tmp_path / "results"
    arguments = ["--config", "tiny", "--tasks", "arc_easy", "--eval-size", "12", "--part-size", "8", "--rounds", "2"]
    arguments += ["--out", str(out), "--record", str(record), "--modes", "zero_shot", "standalone"]
    assert reproduce.main(arguments) == 0
    report = json.loads((record / "reproduction.json").read_text())
    task = report["tasks"]["arc_easy"]
    assert task["n_eval"] == 12 and set(task["parties"]["client_0"]) == {"zero_shot", "standalone"}
    assert (record / "reproduction" / "accuracy_per_round.png").stat().st_size > 0
    assert "standalone" in (record / "reproduction" / "table.md").read_text()
    recorded = sorted(p.name for p in (record / "reproduction" / "runs").glob("*.json"))
    assert [name.split("-")[1] for name in recorded] == ["standalone", "zero_shot"]

    calls = []
    real_fit = reproduce.fit
    monkeypatch.setattr(reproduce, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    assert reproduce.main(arguments) == 0
    assert calls == []  # both cells reused from the record

    # A tuning try of a KD setting: neither mode reads it, so both cells are reused, and the try's
    # report goes to its own folder while the main one is kept and lists the try.
    main_report = (record / "reproduction.json").read_text()
    try_arguments = [*arguments, "--try", "kd-answer", "--override", "transfer.kd_positions=answer"]
    assert reproduce.main(try_arguments) == 0
    assert calls == []
    assert (record / "reproduction.json").read_text() == main_report
    tried = json.loads((record / "reproduction" / "tries" / "kd-answer" / "reproduction.json").read_text())
    assert tried["settings"]["overrides"] == ["transfer.kd_positions=answer"]
    assert tried["tasks"]["arc_easy"]["parties"] == json.loads(main_report)["tasks"]["arc_easy"]["parties"]
    assert (
        "| kd-answer | arc_easy | transfer.kd_positions=answer | client_0 |"
        in (record / "reproduction" / "table.md").read_text()
    )

    # Cut the standalone run back to its round-1 checkpoint state: the grid resumes it, not restarts.
    for path in (record / "reproduction" / "runs").glob("arc_easy-standalone-*.json"):
        path.unlink()
    (run_dir,) = (out / "arc_easy").glob("standalone-*")
    checkpoint = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    checkpoint["round"] = 1
    checkpoint["summary"]["rounds"] = checkpoint["summary"]["rounds"][:1]
    (run_dir / "checkpoint" / "checkpoint.json").write_text(json.dumps(checkpoint))
    (run_dir / "summary.json").write_text(json.dumps(checkpoint["summary"]))
    before = json.loads((record / "reproduction.json").read_text())["tasks"]["arc_easy"]["parties"]
    assert reproduce.main(arguments) == 0
    assert calls == [{"resume": str(run_dir), "overwrite": False}]
    after = json.loads((record / "reproduction.json").read_text())["tasks"]["arc_easy"]["parties"]
    assert after["client_0"]["standalone"]["acc"] == pytest.approx(before["client_0"]["standalone"]["acc"])

    # A call for another task keeps what has finished for this one in the report.
    other = [a if a != "arc_easy" else "boolq" for a in arguments[: arguments.index("--modes")]]
    assert reproduce.main([*other, "--modes", "zero_shot"]) == 0
    report = json.loads((record / "reproduction.json").read_text())
    assert list(report["tasks"]) == ["arc_easy", "boolq"]
    assert report["tasks"]["arc_easy"]["parties"] == after
    assert list(report["settings"]["tasks"]) == ["arc_easy", "boolq"]
    assert "## boolq" in (record / "reproduction" / "table.md").read_text()
    # A try reports only the tasks it was run on, though BoolQ's Zero-Shot would fit its settings.
    assert reproduce.main(try_arguments) == 0
    tried = json.loads((record / "reproduction" / "tries" / "kd-answer" / "reproduction.json").read_text())
    assert list(tried["tasks"]) == ["arc_easy"]


@pytest.mark.slow
def test_grids_side_by_side_each_report_the_cells_the_other_finished(reproduce, tmp_path, monkeypatch):
    """Two calls with other --modes run at once: the one that finishes last still reports both."""
    out = tmp_path / "runs"
    common = ["--config", "tiny", "--tasks", "arc_easy", "--eval-size", "12", "--part-size", "8", "--rounds", "1"]
    common += ["--out", str(out)]
    alongside, record = tmp_path / "alongside", tmp_path / "results"
    assert reproduce.main([*common, "--record", str(alongside), "--modes", "zero_shot"]) == 0
    (finished_alongside,) = (alongside / "reproduction" / "runs").glob("arc_easy-zero_shot-*.json")

    real_fit = reproduce.fit

    def fit_while_the_other_grid_finishes(*args, **kwargs):
        runs_folder = record / "reproduction" / "runs"
        runs_folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(finished_alongside, runs_folder / finished_alongside.name)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(reproduce, "fit", fit_while_the_other_grid_finishes)
    assert reproduce.main([*common, "--record", str(record), "--modes", "standalone"]) == 0
    parties = json.loads((record / "reproduction.json").read_text())["tasks"]["arc_easy"]["parties"]
    assert set(parties["client_0"]) == {"zero_shot", "standalone"}
    assert "Not run yet: fedmkt" in (record / "reproduction" / "table.md").read_text()


def _fake_checkpoint(run_dir: Path, round_index: int) -> None:
    (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    adapter = run_dir / "adapters" / f"round_{round_index}" / "server"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(bytes([round_index]) * 64)
    (run_dir / "checkpoint" / "public_losses_server.safetensors").write_bytes(bytes([round_index]) * 8)
    (run_dir / "checkpoint" / "checkpoint.json").write_text(json.dumps({"round": round_index}))


def test_checkpoint_mirror_keeps_exactly_the_last_round(reproduce, tmp_path):
    run_dir, mirror_dir = tmp_path / "run", tmp_path / "record" / "in_progress" / "cell"
    mirror = reproduce.CheckpointMirror(run_dir, mirror_dir, earlier_seconds=100.0)
    assert mirror.sync() is False  # nothing to mirror before the first checkpoint
    _fake_checkpoint(run_dir, 1)
    assert mirror.sync() is True and mirror.sync() is False  # copied once, then unchanged
    _fake_checkpoint(run_dir, 2)
    assert mirror.sync() is True
    assert sorted(p.name for p in (mirror_dir / "adapters").iterdir()) == ["round_2"]
    assert (mirror_dir / "adapters" / "round_2" / "server" / "adapter_model.safetensors").read_bytes() == bytes(
        [2]
    ) * 64
    assert json.loads((mirror_dir / "checkpoint" / "checkpoint.json").read_text()) == {"round": 2}
    saved = json.loads((mirror_dir / reproduce.MIRROR_RECORD).read_text())
    assert saved["round"] == 2 and saved["wall_seconds"] >= 100.0
    assert sorted(p.name for p in mirror_dir.parent.iterdir()) == ["cell"]  # no staging folders left

    # A fresh checkout: the run folder is gone, and the mirror puts round 2 back for --resume.
    fresh = tmp_path / "fresh"
    assert reproduce.restore_mirror(mirror_dir, fresh) == pytest.approx(saved["wall_seconds"])
    assert json.loads((fresh / "checkpoint" / "checkpoint.json").read_text()) == {"round": 2}
    assert (fresh / "checkpoint" / "public_losses_server.safetensors").read_bytes() == bytes([2]) * 8
    # Resuming there, the restored round is not mirrored again (its recorded time stays that of round 2).
    resumed = reproduce.CheckpointMirror(fresh, mirror_dir, earlier_seconds=saved["wall_seconds"])
    assert resumed.sync() is False
    assert json.loads((mirror_dir / reproduce.MIRROR_RECORD).read_text()) == saved
    _fake_checkpoint(fresh, 3)
    assert resumed.sync() is True
    assert json.loads((mirror_dir / reproduce.MIRROR_RECORD).read_text())["round"] == 3
    # A run folder with its own checkpoint at least as recent keeps it.
    _fake_checkpoint(run_dir, 3)
    reproduce.restore_mirror(mirror_dir, run_dir)
    assert json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text()) == {"round": 3}
    assert reproduce.restore_mirror(tmp_path / "no-mirror", tmp_path / "other") == 0.0


@pytest.mark.slow
def test_grid_continues_a_run_from_its_mirror_in_a_fresh_checkout(reproduce, tmp_path, monkeypatch):
    """A run cut after round 1 whose run folder is lost continues from the mirror in the state folder
    and ends as an uninterrupted run does."""
    arguments = ["--config", "tiny", "--tasks", "arc_easy", "--eval-size", "12", "--part-size", "8", "--rounds", "2"]
    arguments += ["--modes", "fedmkt", "--state-dir", str(tmp_path / "state")]
    whole = tmp_path / "whole"
    assert reproduce.main([*arguments, "--out", str(whole / "runs"), "--record", str(whole / "results")]) == 0
    (expected,) = (whole / "results" / "reproduction" / "runs").glob("*.json")

    out, record = tmp_path / "runs", tmp_path / "results"
    real_fit = reproduce.fit

    def killed_after_round_1(config, **kwargs):
        cut = copy.deepcopy(config)
        cut.federation.rounds = 1
        real_fit(cut, **kwargs)
        raise KeyboardInterrupt  # the sitting ends here

    monkeypatch.setattr(reproduce, "fit", killed_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main([*arguments, "--out", str(out), "--record", str(record)])
    (mirror_dir,) = (tmp_path / "state" / "in_progress").iterdir()
    assert not (record / "reproduction" / "in_progress").exists()  # nothing large goes into the results
    assert json.loads((mirror_dir / reproduce.MIRROR_RECORD).read_text())["round"] == 1
    shutil.rmtree(out)  # the run folders are gone; the state folder is what continues the run

    calls = []
    monkeypatch.setattr(reproduce, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    assert reproduce.main([*arguments, "--out", str(out), "--record", str(record)]) == 0
    assert calls == [{"resume": str(out / "arc_easy" / mirror_dir.name.removeprefix("arc_easy-")), "overwrite": False}]
    assert not mirror_dir.exists()  # replaced by the record
    resumed = json.loads((record / "reproduction" / "runs" / expected.name).read_text())
    uninterrupted = json.loads(expected.read_text())
    for got, want in zip(resumed["rounds"], uninterrupted["rounds"], strict=True):
        for party, entry in want["parties"].items():
            for key in ("distill_loss", "fine_tune_loss", "eval_accuracy"):
                if entry.get(key) is not None:
                    assert got["parties"][party][key] == pytest.approx(entry[key], abs=1e-4), (party, key)


# Runs reproduce.py in a subprocess whose first prediction step after a round checkpoint exists
# sends SIGTERM to the process itself: a signal in the middle of round 2, as a scheduler's would be.
SIGNALLING_GRID = """
import importlib.util, os, signal, sys
from pathlib import Path
from fedmkt.party_module import PartyModule

spec = importlib.util.spec_from_file_location("reproduce", sys.argv[1])
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)
out = Path(sys.argv[2])
original = PartyModule.predict_step

def signalled(*args, **kwargs):
    if list(out.rglob("checkpoint/checkpoint.json")):
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

PartyModule.predict_step = signalled
sys.exit(reproduce.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_sigterm_stops_the_grid_in_any_phase_and_the_same_command_continues_it(reproduce, tmp_path, monkeypatch):
    """Lightning alone swallows a SIGTERM that arrives outside its fit loop; the grid stops at once."""
    out, record = tmp_path / "runs", tmp_path / "results"
    arguments = ["--config", "tiny", "--tasks", "arc_easy", "--eval-size", "12", "--part-size", "8", "--rounds", "2"]
    arguments += ["--modes", "fedmkt", "--out", str(out), "--record", str(record), "--state-dir", str(tmp_path / "s")]
    result = subprocess.run(
        [sys.executable, "-c", SIGNALLING_GRID, str(SCRIPT), str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    (mirror_dir,) = (tmp_path / "s" / "in_progress").iterdir()
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == (
        f"reproduce: stopped by SIGTERM in arc_easy fedmkt; its round-1 checkpoint is kept in {mirror_dir}. "
        "Fix: run the same command again to continue from it."
    )
    assert not list((record / "reproduction" / "runs").glob("*.json"))  # not recorded as finished
    (run_dir,) = (out / "arc_easy").iterdir()
    assert not (run_dir / "adapters" / "round_2").exists()

    calls = []
    real_fit = reproduce.fit
    monkeypatch.setattr(reproduce, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    assert reproduce.main(arguments) == 0
    assert calls == [{"resume": str(run_dir), "overwrite": False}]
    (recorded,) = (record / "reproduction" / "runs").glob("*.json")
    assert [r["round"] for r in json.loads(recorded.read_text())["rounds"]] == [1, 2]


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".hidden", ""])
def test_a_try_name_that_is_not_a_plain_folder_name_is_refused(reproduce, name, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--tasks", "arc_easy", "--try", name])
    assert "--try" in capsys.readouterr().err


def test_a_difference_pooled_over_seeds_averages_each_question_over_the_seeds(reproduce):
    from fedmkt.evaluation import pooled_paired_bootstrap

    a, b = "1101001110", "1001011010"
    assert pooled_paired_bootstrap([a], [b]) == reproduce.paired_bootstrap(a, b)
    # Seed 0: +1 on every question; seed 1: no difference -> +0.5 on every question, no spread.
    assert pooled_paired_bootstrap(["1111", "1010"], ["0000", "1010"]) == (0.5, [0.5, 0.5])
    with pytest.raises(ValueError, match="one record per seed"):
        pooled_paired_bootstrap(["1"], ["1", "0"])


def test_seed_s_of_a_cell_changes_only_the_training_seed(reproduce, tmp_path):
    scale = {"eval_size": 12, "part_size": 8, "rounds": 1}
    first = reproduce.grid_config("tiny", "arc_easy", "fedmkt", scale, tmp_path, [])
    third = reproduce.grid_config("tiny", "arc_easy", "fedmkt", scale, tmp_path, [], seed_index=2)
    assert first.training_seed is None and third.training_seed == first.seed + 2 * reproduce.SEED_STRIDE
    assert third.seed == first.seed and third.data == first.data  # the same split and held-out questions
    assert reproduce.settings_hash(first) != reproduce.settings_hash(third)


def test_the_seed_report_lists_each_seed_and_pools_only_seeds_both_sides_finished(reproduce):
    def cell(correct):
        return {"acc": correct.count("1") / len(correct), "correct": correct}

    cells = {"client_0": {"fedmkt": [cell("1100"), cell("1110"), None], "standalone": [cell("1000")] * 3}}
    report = reproduce.seed_report(cells, [("fedmkt", "standalone")])
    assert report["parties"]["client_0"]["fedmkt"] == [0.5, 0.75, None]
    pooled = report["pooled_differences"]["client_0"]["fedmkt-standalone"]
    assert pooled["seeds"] == 2 and pooled["diff"] == pytest.approx((0.25 + 0.5) / 2)
