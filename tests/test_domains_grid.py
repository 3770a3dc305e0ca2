"""benchmarks/domains.py: the domains grid's report shape, its claims, and reuse on a second call."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "domains.py"
TINY = Path(__file__).resolve().parents[1] / "lightning_configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def domains():
    spec = importlib.util.spec_from_file_location("domains", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_cell_is_its_mode_and_variant_and_shared_modes_read_no_public_labels(domains, tmp_path):
    config = tmp_path / "tiny_domains.yaml"
    config.write_text(
        TINY.read_text().replace("  task: arc_easy ", "  client_tasks: [arc_easy, commonsense_qa]\n  task: null ")
    )
    scale = {"eval_size": 6, "pool_size": 12, "public_size": 8, "rounds": 1}
    made = {
        (variant, mode): domains.cell_config(str(config), variant, mode, scale, tmp_path)
        for variant, modes in domains.VARIANTS.items()
        for mode in modes
    }
    assert made["unlabelled", "fedmkt"].data.public_labels is False
    assert made["labelled", "fedmkt"].data.public_labels is None
    assert made["unlabelled", "random_teacher"].transfer.teacher == "random"
    assert made["unlabelled", "hard_teacher"].transfer.teacher == "hard"
    assert made["labelled", "fedmkt_no_kd"].transfer.ce_weight == 1.0
    assert made["labelled", "centralized"].federation.evaluate_every_round is False
    for mode in domains.SHARED:  # one run serves both variants
        assert domains.cell_key("unlabelled", mode) == domains.cell_key("labelled", mode) == "domains-labelled"


@pytest.mark.slow
def test_a_tiny_domains_grid_reports_every_variant_task_and_claim_and_reuses_its_cells(domains, tmp_path, monkeypatch):
    config = tmp_path / "tiny_domains.yaml"
    config.write_text(
        TINY.read_text().replace("  task: arc_easy ", "  client_tasks: [arc_easy, commonsense_qa]\n  task: null ")
    )
    arguments = [
        "--config",
        str(config),
        "--eval-size",
        "6",
        "--pool-size",
        "12",
        "--public-size",
        "8",
        "--rounds",
        "1",
    ]
    arguments += [
        "--out",
        str(tmp_path / "runs"),
        "--record",
        str(tmp_path / "results"),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    assert domains.main(arguments) == 0
    report = json.loads((tmp_path / "results" / "domains.json").read_text())
    assert set(report["variants"]) == {"labelled", "unlabelled"}
    for variant, modes in domains.VARIANTS.items():
        tasks = report["variants"][variant]["tasks"]
        assert set(tasks) == {"arc_easy", "commonsense_qa"}
        for task in tasks.values():
            assert task["n_eval"] == 6
            assert set(task["parties"]["client_0"]) == set(modes)
            assert {"acc", "acc_norm", "ci"} <= set(task["parties"]["client_1"]["fedmkt"])
            assert task["parties"]["server"]["standalone"]["same_as"] == "zero_shot"
            assert "fedmkt-standalone" in task["differences"]["client_0"]
            assert [p["round"] for p in task["per_round"]["client_0"]["fedmkt"]] == [0, 1]
    unlabelled = report["variants"]["unlabelled"]
    assert unlabelled["diagnostics"]["fedmkt"][0]["client_0"]["public_answer_accuracy"] is not None
    assert any("on commonsense_qa (the other client's task)" in c["claim"] for c in report["claims"])
    assert (tmp_path / "results" / "domains_accuracy_per_round.png").stat().st_size > 0

    import reproduce

    calls = []
    monkeypatch.setattr(reproduce, "fit", lambda *a, **k: calls.append(k))
    assert domains.main(arguments) == 0
    assert calls == []  # every cell reused from the record
