"""Reproduce the paper's Table 2 at a scale that can tell a gain from noise, on the embedded scenario.

The embedded scenario (`demo.yaml`: server Gemma-3-270M, two SmolLM2-135M clients) runs in six
modes on the same held-out questions:

  zero_shot      the base models
  standalone     each client fine-tunes on its private part only
  fedmkt         the method (evaluated after every round: the per-round figure)
  centralized    the server trains on the public and all private parts
  fedmkt_no_kd   FedMKT with lambda = 1: the public labels without the KD term
  llm2slm        the server is frozen; clients distil from it one way

Every accuracy comes with its 95 % Wilson interval, and every FedMKT-minus-baseline difference with
a paired bootstrap interval over the same questions (the runs record which questions each party got
right). Outputs:

  <record>/reproduction.json        settings, wall time, accuracies, intervals, differences
  <record>/reproduction/table.md    the same as tables, plus every recorded try
  <record>/reproduction/accuracy_per_round.png
  <record>/reproduction/runs/       each finished run's summary, named by task, mode and settings hash
  <out>/<task>/<mode>/              each run's folder (adapters, round checkpoints, logs)

    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --tasks arc_easy boolq

The grid resumes where it stopped: a run whose summary is recorded under the same settings is
reused, a run killed mid-way continues from its last round checkpoint, and one killed before its
first checkpoint starts over. So the grid may span several sittings. `--modes` and `--tasks` run
part of it; every call rewrites the outputs from what has finished (missing cells are listed).
Extra `--override KEY=VALUE` pairs go to every run and change the settings hash. On a 2-core machine
give each process one thread: two multi-threaded torch processes slow each other down several-fold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from fedmkt.config import RunConfig, parse_run_config
from fedmkt.run import fit

MODES = ("zero_shot", "standalone", "fedmkt", "centralized", "fedmkt_no_kd", "llm2slm")
GRID_ORDER = ("zero_shot", "fedmkt", "standalone", "fedmkt_no_kd", "llm2slm", "centralized")
"""The most informative runs first, so a grid cut short still answers the main question."""

BASELINES = ("standalone", "zero_shot", "fedmkt_no_kd", "centralized", "llm2slm")
EVAL_SIZES = {"arc_easy": 1000, "boolq": 500}
"""Held-out questions per task: about +-3 points (ARC-Easy) and +-4 points (BoolQ) at 95 %."""

UNTRAINED = {"standalone": {"server"}, "llm2slm": {"server"}, "centralized": {"client_0", "client_1"}}
"""Parties a mode leaves untouched: the server has no private data, LLM2SLM freezes the LLM, and
Centralized trains only the server. Their cell is the zero-shot model, marked `same_as`."""

IGNORED_SETTINGS = {"run_dir", "cache_dir", "logging"}
"""Config keys that do not change results, left out of the settings hash."""


def mode_arguments(mode: str) -> list[str]:
    """Command-line overrides that turn the base config into one mode of the grid."""
    if mode == "zero_shot":
        return ["--federation.mode", "zero_shot"]
    once = ["--federation.evaluate_before", "false"]  # the zero_shot run is round 0 for every mode
    if mode == "fedmkt":
        return ["--federation.mode", "fedmkt", *once]
    final_only = [*once, "--federation.evaluate_every_round", "false", "--federation.evaluate_final", "true"]
    if mode == "fedmkt_no_kd":
        return ["--federation.mode", "fedmkt", "--transfer.ce_weight", "1.0", *final_only]
    return ["--federation.mode", mode, *final_only]


def grid_config(base: str, task: str, mode: str, scale: dict, out: Path, overrides: list[str]) -> RunConfig:
    """The RunConfig of one cell: base config, task, scale, mode, then the user's overrides."""
    arguments = [
        "--config",
        base,
        "--data.task",
        task,
        "--data.eval_size",
        str(scale["eval_size"]),
        "--data.pool_size",
        str(3 * scale["part_size"]),  # one public and two private parts
        "--federation.rounds",
        str(scale["rounds"]),
        "--run_dir",
        str(out / task / mode),
        "--logging.wandb",
        "false",
        *mode_arguments(mode),
    ]
    for item in overrides:
        key, _, value = item.partition("=")
        arguments += [f"--{key}", value]
    return parse_run_config(arguments)


def settings_of(config: RunConfig | dict) -> dict:
    """The config as JSON, without the keys that do not change results."""
    tree = asdict(config) if isinstance(config, RunConfig) else config
    tree = json.loads(json.dumps(tree, default=str))
    return {key: value for key, value in tree.items() if key not in IGNORED_SETTINGS}


def settings_hash(config: RunConfig | dict) -> str:
    return hashlib.sha256(json.dumps(settings_of(config), sort_keys=True).encode()).hexdigest()[:10]


def finished(summary: dict, config: RunConfig) -> bool:
    """Whether `summary` is a complete run of exactly `config`'s settings."""
    if settings_of(summary.get("config", {})) != settings_of(config):
        return False
    if config.federation.mode == "zero_shot":
        return bool(summary.get("zero_shot"))
    return len(summary.get("rounds", [])) == config.federation.rounds


def run_cell(config: RunConfig, task: str, mode: str, record: Path, label: str) -> dict:
    """One grid cell: reused when recorded, resumed from its round checkpoint, or run."""
    recorded = record / "runs" / f"{task}-{mode}-{settings_hash(config)}.json"
    if recorded.is_file():
        summary = json.loads(recorded.read_text())
        if finished(summary, config):
            print(f"{label}: reused {recorded}", flush=True)
            return summary
    run_dir = Path(config.run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and finished(json.loads(summary_path.read_text()), config):
        summary = json.loads(summary_path.read_text())
        # Finished outside this script: from the run folder's first and last writes.
        summary["wall_seconds"] = summary_path.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    else:
        resume = str(run_dir) if (run_dir / "checkpoint" / "checkpoint.json").is_file() else None
        print(f"{label}: {'resuming ' + str(run_dir) if resume else 'running'} (log in the run folder)", flush=True)
        start = time.perf_counter()
        summary = fit(config, resume=resume, overwrite=resume is None and run_dir.exists())
        summary = json.loads(json.dumps(summary, default=str))
        # A resumed run reports the time of this sitting only, added to what earlier sittings recorded.
        summary["wall_seconds"] = time.perf_counter() - start
    summary["settings_hash"] = settings_hash(config)
    recorded.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(summary, indent=1, default=str))
    print(f"{label}: done, recorded {recorded}", flush=True)
    return summary


# ---- statistics ---------------------------------------------------------------------------------


def paired_bootstrap(a: str, b: str, resamples: int = 10_000, seed: int = 0) -> tuple[float, list[float]]:
    """Accuracy difference of two models on the same questions, with its 95 % percentile interval.

    `a` and `b` are per-question records ("1" right, "0" wrong) in the same order; each resample
    draws questions with replacement and scores both models on the same draw, so the interval
    reflects how much the two differ on shared questions rather than each model's own noise.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired records must be non-empty and equally long ({len(a)} vs {len(b)})")
    x = np.frombuffer(a.encode(), dtype=np.uint8) - ord("0")
    y = np.frombuffer(b.encode(), dtype=np.uint8) - ord("0")
    delta = (x.astype(np.int64) - y).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x n
        stop = min(start + 1000, resamples)
        means[start:stop] = delta[rng.integers(0, len(delta), size=(stop - start, len(delta)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(delta.mean()), [float(low), float(high)]


def final_entry(summary: dict, party: str) -> Optional[dict]:
    """The party's last evaluated entry (round 0 for a zero-shot run)."""
    entries = [summary.get("zero_shot", {}).get(party)] + [r["parties"].get(party) for r in summary.get("rounds", [])]
    scored = [e for e in entries if e and e.get("eval_accuracy") is not None]
    return scored[-1] if scored else None


def cell_of(entry: dict) -> dict:
    """A report cell from a party's summary entry (its accuracy, Wilson interval, n and per-question record)."""
    return {
        "acc": entry["eval_accuracy"],
        "ci": list(entry["eval_accuracy_ci"]),
        "n": entry["eval_n"],
        "correct": entry.get("eval_correct"),
    }


def assemble(runs: dict[str, dict[str, dict]]) -> dict:
    """`tasks` of reproduction.json from finished runs: `{task: {mode: summary}}`."""
    tasks = {}
    for task, by_mode in runs.items():
        held_out = {json.dumps([s["config"]["seed"], s["config"]["data"]], sort_keys=True) for s in by_mode.values()}
        if len(held_out) > 1:  # paired comparisons need the very same questions in every mode
            raise SystemExit(f"{task}: runs differ in seed or data settings; rerun them with the same ones")
        zero_shot = by_mode.get("zero_shot")
        parties_names = _party_names(by_mode)
        parties: dict[str, dict] = {p: {} for p in parties_names}
        for mode in MODES:
            summary = by_mode.get(mode)
            if summary is None:
                continue
            for party in parties_names:
                if party in UNTRAINED.get(mode, ()):
                    if zero_shot is not None and final_entry(zero_shot, party):
                        parties[party][mode] = cell_of(final_entry(zero_shot, party)) | {"same_as": "zero_shot"}
                    continue
                entry = final_entry(summary, party)
                if entry is not None:
                    parties[party][mode] = cell_of(entry)
        sizes = {cell["n"] for cells in parties.values() for cell in cells.values()}
        if len(sizes) > 1:
            raise SystemExit(f"{task}: runs were evaluated on different numbers of questions {sorted(sizes)}")
        differences = {}
        for party, cells in parties.items():
            if "fedmkt" not in cells:
                continue
            differences[party] = {}
            for baseline in BASELINES:
                if baseline in cells and cells["fedmkt"]["correct"] and cells[baseline]["correct"]:
                    diff, ci = paired_bootstrap(cells["fedmkt"]["correct"], cells[baseline]["correct"])
                    differences[party][f"fedmkt-{baseline}"] = {"diff": diff, "ci": ci}
        for cells in parties.values():
            for cell in cells.values():
                cell.pop("correct")
                cell.pop("n")
        tasks[task] = {
            "n_eval": sizes.pop() if sizes else 0,
            "parties": parties,
            "differences": differences,
            "missing": [mode for mode in MODES if mode not in by_mode],
        }
    return tasks


def _party_names(by_mode: dict[str, dict]) -> list[str]:
    summary = next(iter(by_mode.values()))
    return ["server"] + [f"client_{i}" for i in range(len(summary["config"]["clients"]))]


# ---- outputs ------------------------------------------------------------------------------------


def _percent(cell: Optional[dict]) -> str:
    if cell is None:
        return "–"
    low, high = cell["ci"]
    mark = " =ZS" if cell.get("same_as") else ""
    return f"{100 * cell['acc']:.1f} [{100 * low:.1f}, {100 * high:.1f}]{mark}"


def _points(item: Optional[dict]) -> str:
    if item is None:
        return "–"
    low, high = item["ci"]
    return f"{100 * item['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def table(report: dict, tries: list[str]) -> str:
    lines = []
    for task, result in report["tasks"].items():
        lines += [
            f"## {task}: accuracy (%) [95 % Wilson CI], n = {result['n_eval']} held-out questions",
            "",
            "| party | " + " | ".join(MODES) + " |",
            "|---|" + "---|" * len(MODES),
        ]
        for party, cells in result["parties"].items():
            lines.append(f"| {party} | " + " | ".join(_percent(cells.get(mode)) for mode in MODES) + " |")
        lines += [
            "",
            "=ZS: the mode does not train this party, so it is the zero-shot model.",
            "",
            "FedMKT minus baseline (points) [95 % paired bootstrap CI, same questions]:",
            "",
            "| party | " + " | ".join(f"fedmkt-{b}" for b in BASELINES) + " |",
            "|---|" + "---|" * len(BASELINES),
        ]
        for party, items in result["differences"].items():
            lines.append(f"| {party} | " + " | ".join(_points(items.get(f"fedmkt-{b}")) for b in BASELINES) + " |")
        if result["missing"]:
            lines += ["", f"Not run yet: {', '.join(result['missing'])}."]
        lines.append("")
    lines += ["## Every recorded try (task-mode-settings hash)", "", *[f"- {name}" for name in tries], ""]
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    """FedMKT accuracy per round per party (with CI bars), the other modes' final accuracy at the last round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for axis, (task, by_mode) in zip(axes[0], runs.items()):
        names = _party_names(by_mode)
        for index, party in enumerate(names):
            color = f"C{index}"
            points = []
            if "zero_shot" in by_mode and final_entry(by_mode["zero_shot"], party):
                points.append((0, final_entry(by_mode["zero_shot"], party)))
            for record in by_mode.get("fedmkt", {}).get("rounds", []):
                entry = record["parties"].get(party, {})
                if entry.get("eval_accuracy") is not None:
                    points.append((record["round"], entry))
            if points:
                xs = [x for x, _ in points]
                cells = [cell_of(e) for _, e in points]
                ys = [100 * c["acc"] for c in cells]
                errors = [
                    [100 * (c["acc"] - c["ci"][0]) for c in cells],
                    [100 * (c["ci"][1] - c["acc"]) for c in cells],
                ]
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=color, label=f"{party} fedmkt")
            for marker, mode in zip("sv^D", ("standalone", "centralized", "fedmkt_no_kd", "llm2slm")):
                summary = by_mode.get(mode)
                if summary is None or party in UNTRAINED.get(mode, ()) or not summary.get("rounds"):
                    continue
                entry = final_entry(summary, party)
                if entry is not None:
                    x = summary["rounds"][-1]["round"] + 0.08 * (index + 1)
                    axis.plot([x], [100 * entry["eval_accuracy"]], marker=marker, color=color, linestyle="none")
        for marker, mode in zip("sv^D", ("standalone", "centralized", "fedmkt_no_kd", "llm2slm")):
            axis.plot([], [], marker=marker, color="grey", linestyle="none", label=mode)
        axis.set(title=task, xlabel="round", ylabel="accuracy (%)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(runs: dict[str, dict[str, dict]], settings: dict, record: Path) -> dict:
    report = {
        "settings": settings,
        "wall_seconds": sum(s.get("wall_seconds") or 0.0 for by_mode in runs.values() for s in by_mode.values()),
        "tasks": assemble(runs),
    }
    report["settings"]["wall_seconds_per_run"] = {
        f"{task}/{mode}": summary.get("wall_seconds")
        for task, by_mode in runs.items()
        for mode, summary in by_mode.items()
    }
    folder = record / "reproduction"
    folder.mkdir(parents=True, exist_ok=True)
    (record / "reproduction.json").write_text(json.dumps(report, indent=2) + "\n")
    tries = sorted(p.stem for p in (folder / "runs").glob("*.json"))
    (folder / "table.md").write_text(table(report, tries))
    if runs:
        plot(runs, folder / "accuracy_per_round.png")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="base config (demo: the real embedded models)")
    parser.add_argument("--tasks", nargs="+", default=list(EVAL_SIZES), help="tasks, in the order they run")
    parser.add_argument("--modes", nargs="+", default=list(GRID_ORDER), choices=MODES, help="run only these modes")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="held-out questions (default: per task, see EVAL_SIZES)"
    )
    parser.add_argument(
        "--part-size", type=int, default=300, help="questions in the public part and in each private part"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="run folders")
    parser.add_argument("--record", type=Path, default=Path("benchmarks/results"), help="where results are recorded")
    parser.add_argument("--override", nargs="*", default=[], help="KEY=VALUE config overrides for every run")
    args = parser.parse_args(argv)
    modes = [mode for mode in GRID_ORDER if mode in args.modes]
    record = args.record / "reproduction"
    runs: dict[str, dict[str, dict]] = {}
    cells = [(task, mode) for task in args.tasks for mode in modes]
    settings: dict = {"base_config": args.config, "part_size": args.part_size, "rounds": args.rounds, "tasks": {}}
    settings["overrides"] = args.override
    for index, (task, mode) in enumerate(cells, 1):
        scale = {
            "eval_size": args.eval_size or EVAL_SIZES.get(task, 1000),
            "part_size": args.part_size,
            "rounds": args.rounds,
        }
        settings["tasks"][task] = {"n_eval": scale["eval_size"]}
        config = grid_config(args.config, task, mode, scale, args.out, args.override)
        settings["tasks"][task][f"settings_hash_{mode}"] = settings_hash(config)
        summary = run_cell(config, task, mode, record, f"[{index}/{len(cells)}] {task} {mode}")
        runs.setdefault(task, {})[mode] = summary
        report = write_outputs(runs, dict(settings), args.record)  # after every cell, so a cut grid still reports
    print((record / "table.md").read_text())
    print(f"wall time of the runs: {report['wall_seconds']:.0f} s; {args.record / 'reproduction.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
