"""The domains scenario (`domains.yaml`): clients from different tasks, where knowledge has to travel.

client_0 holds ARC-Easy, client_1 CommonsenseQA; the public set is drawn from both; every party is
scored on a held-out set of each task. Two variants of the public set, each with its controls:

  labelled     zero_shot, standalone, fedmkt, fedmkt_no_kd (lambda = 1), centralized
  unlabelled   zero_shot, standalone, fedmkt, random_teacher, hard_teacher (`transfer.teacher`)

Zero-Shot and Standalone never read the public set's labels, so both variants share those runs.
Per task, every accuracy comes with its Wilson interval (acc_norm beside it), and every difference
with a paired bootstrap interval on the same questions, pooled over the seeds that both sides have
finished (`--seeds`). The runs that distill are evaluated after every round; the per-round figure
and the diagnostics (the server's selections per client, how often each party's public answers are
the gold ones) show where knowledge stops. Outputs:

  <record>/domains.json                    settings, per variant and task: cells and differences
  <record>/domains/table.md                the same as tables, with per-round rows and diagnostics
  <record>/domains_accuracy_per_round.png  per party and task: accuracy per round, FedMKT and controls
  <record>/domains/runs/                   each finished run's summary
  <state>/in_progress/<cell>/              the last round checkpoint of each unfinished run

    OMP_NUM_THREADS=2 python benchmarks/domains.py --seeds 3

It resumes like `reproduce.py` (whose cell machinery it uses): a finished cell is reused, a killed
one continues from its round checkpoint mirrored in `--state-dir` (default: the fedmkt cache's
`domains/`), and every finished cell rewrites the outputs. Cells run the most informative first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402  (the grid machinery: settings hash, cells, checkpoint mirrors)

from fedmkt.config import RunConfig, parse_run_config  # noqa: E402
from fedmkt.errors import RunInterrupted  # noqa: E402
from fedmkt.evaluation import pooled_paired_bootstrap  # noqa: E402
from fedmkt.files import atomic_write_text  # noqa: E402
from fedmkt.interrupts import stop_on_signals  # noqa: E402
from fedmkt.models import cache_root  # noqa: E402

VARIANTS = {
    "labelled": ("zero_shot", "standalone", "fedmkt", "fedmkt_no_kd", "centralized"),
    "unlabelled": ("zero_shot", "standalone", "fedmkt", "random_teacher", "hard_teacher"),
}
SHARED = {"zero_shot", "standalone"}
"""Modes that never read the public set: one run serves both variants (recorded as `labelled`)."""

ORDER = (
    ("labelled", "zero_shot"),
    ("labelled", "fedmkt"),
    ("labelled", "standalone"),
    ("unlabelled", "fedmkt"),
    ("unlabelled", "random_teacher"),
    ("labelled", "fedmkt_no_kd"),
    ("unlabelled", "hard_teacher"),
    ("labelled", "centralized"),
)
"""Cells in the order they run: the ones the claims rest on first."""

PAIRS = {
    "labelled": [
        ("fedmkt", "standalone"),
        ("fedmkt", "zero_shot"),
        ("fedmkt", "fedmkt_no_kd"),
        ("fedmkt", "centralized"),
        ("standalone", "zero_shot"),
    ],
    "unlabelled": [
        ("fedmkt", "standalone"),
        ("fedmkt", "zero_shot"),
        ("fedmkt", "random_teacher"),
        ("fedmkt", "hard_teacher"),
        ("standalone", "zero_shot"),
    ],
}
UNTRAINED = {"standalone": {"server"}, "centralized": {"client_0", "client_1"}}
"""Parties a mode leaves untouched: their cell is the zero-shot model, marked `same_as`."""

PER_ROUND = {"fedmkt", "fedmkt_no_kd", "random_teacher", "hard_teacher"}
"""Modes evaluated after every round (the others once, after the last)."""

TEACHER = {"random_teacher": "random", "hard_teacher": "hard"}


def mode_arguments(variant: str, mode: str) -> list[str]:
    """Overrides that make the base config one cell's mode and variant."""
    once = ["--federation.evaluate_before", "false"]  # the zero_shot run is round 0 for every mode
    final_only = ["--federation.evaluate_every_round", "false", "--federation.evaluate_final", "true"]
    if mode == "zero_shot":
        return ["--federation.mode", "zero_shot"]
    arguments = ["--federation.mode", "fedmkt" if mode in PER_ROUND else mode, *once]
    if mode not in PER_ROUND:
        arguments += final_only
    if mode == "fedmkt_no_kd":
        arguments += ["--transfer.ce_weight", "1.0"]
    if mode in TEACHER:
        arguments += ["--transfer.teacher", TEACHER[mode]]
    if variant == "unlabelled" and mode not in SHARED:
        arguments += ["--data.public_labels", "false"]
    return arguments


def cell_config(base: str, variant: str, mode: str, scale: dict, out: Path, seed_index: int = 0) -> RunConfig:
    """The RunConfig of one cell: the base config at `scale`, the mode, the seed."""
    arguments = ["--config", base, "--logging.wandb", "false", "--federation.rounds", str(scale["rounds"])]
    for key in ("eval_size", "pool_size", "public_size"):
        arguments += [f"--data.{key}", str(scale[key])]
    arguments += mode_arguments(variant, mode)
    arguments += reproduce.seed_arguments(parse_run_config(arguments).seed, seed_index)
    config = parse_run_config(arguments)
    config.run_dir = str(out / variant / f"{mode}-{reproduce.settings_hash(config)}")
    return config


def cell_key(variant: str, mode: str) -> str:
    """The name a cell's runs are recorded under (`domains-labelled`, ...): shared modes under labelled."""
    return f"domains-{'labelled' if mode in SHARED else variant}"


# ---- the report ---------------------------------------------------------------------------------


def task_names(summary: dict) -> list[str]:
    """The tasks a run was scored on (its `data.client_tasks`)."""
    return list(summary["config"]["data"]["client_tasks"])


def final_entry(summary: Optional[dict], party: str) -> Optional[dict]:
    return reproduce.final_entry(summary, party) if summary else None


def cells_of(summaries: dict[str, list[Optional[dict]]], task: str, parties: list[str]) -> dict:
    """Per party and mode, the cell of each seed on `task` (None where that seed has not finished)."""
    zero_shot = summaries.get("zero_shot", [None])[0]
    cells: dict[str, dict[str, list]] = {party: {} for party in parties}
    for mode, by_seed in summaries.items():
        for party in parties:
            untrained = party in UNTRAINED.get(mode, ()) or mode == "zero_shot"
            source = [zero_shot] * len(by_seed) if untrained else by_seed
            row = []
            for summary in source:
                entry = final_entry(summary, party)
                cell = reproduce.cell_of(entry, f"eval_{task}") if entry else None
                if cell and untrained and mode != "zero_shot":
                    cell["same_as"] = "zero_shot"
                row.append(cell)
            if any(row):
                cells[party][mode] = row
    return cells


def per_round(summaries: dict[str, list[Optional[dict]]], task: str, parties: list[str]) -> dict:
    """Per party and mode (seed 0): accuracy and interval on `task` after each round (0: zero-shot)."""
    rows: dict[str, dict[str, list]] = {}
    zero_shot = summaries.get("zero_shot", [None])[0]
    for mode, by_seed in summaries.items():
        summary = by_seed[0]
        if mode not in PER_ROUND or summary is None:
            continue
        for party in parties:
            points = []
            start = final_entry(zero_shot, party)
            if start:
                points.append({"round": 0, **_short(reproduce.cell_of(start, f"eval_{task}"))})
            for record in summary.get("rounds", []):
                entry = record["parties"].get(party, {})
                if entry.get(f"eval_{task}_accuracy") is not None:
                    points.append({"round": record["round"], **_short(reproduce.cell_of(entry, f"eval_{task}"))})
            rows.setdefault(party, {})[mode] = points
    return rows


def _short(cell: dict) -> dict:
    return {"acc": cell["acc"], "acc_norm": cell["acc_norm"], "ci": cell["ci"]}


def diagnostics(summaries: dict[str, list[Optional[dict]]], parties: list[str]) -> dict:
    """Per mode (seed 0) and round: whom each party selected how often, and how often its own public
    answers were the gold ones (unlabelled public sets)."""
    found: dict[str, list] = {}
    for mode, by_seed in summaries.items():
        summary = by_seed[0]
        if summary is None or mode not in PER_ROUND:
            continue
        for record in summary.get("rounds", []):
            row = {"round": record["round"]}
            for party in parties:
                entry = record["parties"].get(party, {})
                row[party] = {key: entry.get(key) for key in ("selected", "teacher_counts", "public_answer_accuracy")}
            found.setdefault(mode, []).append(row)
    return found


def variant_report(variant: str, summaries: dict[str, list[Optional[dict]]]) -> dict:
    """`{"tasks": {TASK: {"n_eval", "parties", "differences", ...}}}` of one variant."""
    finished = [s for by_seed in summaries.values() for s in by_seed if s]
    if not finished:
        return {"tasks": {}, "missing": list(VARIANTS[variant])}
    parties = reproduce._party_names({"any": finished[0]})
    tasks = {}
    for task in task_names(finished[0]):
        cells = cells_of(summaries, task, parties)
        sizes = {cell["n"] for by_mode in cells.values() for row in by_mode.values() for cell in row if cell}
        if len(sizes) > 1:
            raise SystemExit(
                f"domains {variant} {task}: runs were scored on different numbers of questions {sorted(sizes)}"
            )
        differences: dict[str, dict] = {}
        for party, by_mode in cells.items():
            for a, b in PAIRS[variant]:
                both = [
                    (x["correct"], y["correct"])
                    for x, y in zip(by_mode.get(a, []), by_mode.get(b, []))
                    if x and y and x.get("correct") and y.get("correct")
                ]
                if not both or any((x or {}).get("same_as") for x in by_mode.get(a, [])):
                    continue
                diff, ci = pooled_paired_bootstrap([x for x, _ in both], [y for _, y in both])
                differences.setdefault(party, {})[f"{a}-{b}"] = {"diff": diff, "ci": ci, "seeds": len(both)}
        tasks[task] = {
            "n_eval": sizes.pop() if sizes else 0,
            "parties": {
                party: {mode: _first_cell(row) for mode, row in by_mode.items() if row[0]}
                for party, by_mode in cells.items()
            },
            "seeds": {
                party: {mode: [None if c is None else c["acc"] for c in row] for mode, row in by_mode.items()}
                for party, by_mode in cells.items()
            },
            "differences": differences,
            "per_round": per_round(summaries, task, parties),
        }
    return {
        "tasks": tasks,
        "diagnostics": diagnostics(summaries, parties),
        "missing": [mode for mode in VARIANTS[variant] if not summaries.get(mode, [None])[0]],
    }


def _first_cell(row: list[Optional[dict]]) -> dict:
    cell = row[0]
    return {"acc": cell["acc"], "acc_norm": cell["acc_norm"], "ci": cell["ci"]} | (
        {"same_as": cell["same_as"]} if cell.get("same_as") else {}
    )


def claims(report: dict) -> list[dict]:
    """The scenario's claims, each with a verdict from its paired interval (see `reproduce.paper_shape`)."""
    found = []

    def add(claim: str, item: Optional[dict]) -> None:
        if item is None:
            verdict, evidence = "not measured", "–"
        else:
            low, high = item["ci"]
            verdict = "holds" if low > 0 else "contradicted" if high < 0 else "not shown"
            evidence = f"{reproduce._points(item)} over {item['seeds']} seed(s)"
        found.append({"claim": claim, "verdict": verdict, "evidence": evidence})

    for variant, result in report["variants"].items():
        tasks = list(result["tasks"])
        for index, task in enumerate(tasks):
            differences = result["tasks"][task]["differences"]
            for client in (f"client_{i}" for i in range(len(tasks)) if i != index):
                add(
                    f"{variant}: {client} on {task} (the other client's task): FedMKT > Standalone",
                    differences.get(client, {}).get("fedmkt-standalone"),
                )
                if variant == "unlabelled":
                    add(
                        f"{variant}: {client} on {task}: FedMKT > random teacher",
                        differences.get(client, {}).get("fedmkt-random_teacher"),
                    )
            add(
                f"{variant}: server on {task}: FedMKT > Zero-Shot",
                differences.get("server", {}).get("fedmkt-zero_shot"),
            )
            control = "fedmkt-fedmkt_no_kd" if variant == "labelled" else "fedmkt-hard_teacher"
            for party in ("server", *(f"client_{i}" for i in range(len(tasks)))):
                add(
                    f"{variant}: {party} on {task}: FedMKT > its {control.split('-')[1]} control",
                    differences.get(party, {}).get(control),
                )
    return found


def table(report: dict) -> str:
    lines = ["# Domains scenario", ""]
    for variant, result in report["variants"].items():
        for task, entry in result["tasks"].items():
            modes = VARIANTS[variant]
            lines += [
                f"## {variant} public set, {task}: accuracy (%) [95 % Wilson CI] (acc_norm), n = {entry['n_eval']}",
                "",
                "| party | " + " | ".join(modes) + " |",
                "|---|" + "---|" * len(modes),
            ]
            for party, by_mode in entry["parties"].items():
                lines.append(f"| {party} | " + " | ".join(reproduce._percent(by_mode.get(m)) for m in modes) + " |")
            pairs = [f"{a}-{b}" for a, b in PAIRS[variant]]
            lines += ["", "Differences (points) [95 % paired bootstrap CI, pooled over seeds]:", ""]
            lines += ["| party | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
            for party, items in entry["differences"].items():
                lines.append(f"| {party} | " + " | ".join(_with_seeds(items.get(p)) for p in pairs) + " |")
            lines += ["", "Per round (seed 0): accuracy (%) [Wilson CI] (acc_norm):", ""]
            lines += ["| party | mode | rounds 0, 1, ... |", "|---|---|---|"]
            for party, by_mode in entry["per_round"].items():
                for mode, points in by_mode.items():
                    lines.append(f"| {party} | {mode} | " + "; ".join(reproduce._percent(p) for p in points) + " |")
            lines.append("")
        if result.get("diagnostics"):
            lines += [f"### {variant}: selections and public-answer accuracy per round (seed 0)", ""]
            for mode, rows in result["diagnostics"].items():
                for row in rows:
                    parts = [
                        f"{party}: selected {values['selected']} {values['teacher_counts'] or ''}"
                        + (
                            f", own public answers gold {100 * values['public_answer_accuracy']:.1f} %"
                            if values.get("public_answer_accuracy") is not None
                            else ""
                        )
                        for party, values in row.items()
                        if party != "round"
                    ]
                    lines.append(f"- {mode} round {row['round']}: " + "; ".join(parts))
            lines.append("")
        if result["missing"]:
            lines += [f"Not run yet ({variant}): {', '.join(result['missing'])}.", ""]
    lines += ["## Claims (verdicts from the paired intervals)", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}** ({c['evidence']})" for c in report["claims"]]
    return "\n".join(lines) + "\n"


def _with_seeds(item: Optional[dict]) -> str:
    return "–" if item is None else f"{reproduce._points(item)} ({item['seeds']} s)"


def plot(report: dict, path: Path) -> None:
    """Per party (rows) and task (columns): accuracy per round with CIs, FedMKT and its controls."""
    try:
        import matplotlib
    except ImportError:
        print(f"domains: matplotlib is not installed, so {path.name} is not drawn (pip install -e '.[plots]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for result in report["variants"].values() for task in result["tasks"]})
    parties = sorted(
        {p for result in report["variants"].values() for e in result["tasks"].values() for p in e["parties"]},
        key=lambda name: (name != "server", name),
    )
    if not tasks or not parties:
        return
    figure, axes = plt.subplots(len(parties), len(tasks), figsize=(5.5 * len(tasks), 3.6 * len(parties)), squeeze=False)
    styles = {"labelled": "-", "unlabelled": "--"}
    for row, party in enumerate(parties):
        for column, task in enumerate(tasks):
            axis = axes[row][column]
            for variant, result in report["variants"].items():
                for index, (mode, points) in enumerate(
                    result["tasks"].get(task, {}).get("per_round", {}).get(party, {}).items()
                ):
                    xs = [p["round"] + 0.04 * index for p in points]
                    ys = [100 * p["acc"] for p in points]
                    errors = [
                        [100 * (p["acc"] - p["ci"][0]) for p in points],
                        [100 * (p["ci"][1] - p["acc"]) for p in points],
                    ]
                    axis.errorbar(
                        xs, ys, yerr=errors, capsize=2, marker="o", linestyle=styles[variant], label=f"{variant} {mode}"
                    )
                for mode in ("standalone", "centralized"):
                    cell = result["tasks"].get(task, {}).get("parties", {}).get(party, {}).get(mode)
                    if cell and not cell.get("same_as") and variant == "labelled":
                        axis.axhline(
                            100 * cell["acc"],
                            linestyle=":",
                            color="grey" if mode == "standalone" else "black",
                            label=mode,
                        )
            axis.set(title=f"{party} on {task}", xlabel="round", ylabel="accuracy (%)")
            axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="domains", help="base config (domains: the real embedded models)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out questions per task (at most)")
    parser.add_argument(
        "--pool-size", type=int, default=450, help="per task: its public share + its client's private part"
    )
    parser.add_argument(
        "--public-size", type=int, default=300, help="the whole public set, drawn evenly from the tasks"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per trained cell (the split fixed)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/domains"), help="run folders")
    parser.add_argument("--record", type=Path, default=Path("benchmarks/results"), help="where results are recorded")
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="round-checkpoint mirrors (default: the fedmkt cache's domains/)"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: use 1 or more")
    scale = {
        "eval_size": args.eval_size,
        "pool_size": args.pool_size,
        "public_size": args.public_size,
        "rounds": args.rounds,
    }
    record = args.record / "domains"
    state = args.state_dir or cache_root() / "domains"
    configs = {
        (variant, mode, s): cell_config(
            args.config, "labelled" if mode in SHARED else variant, mode, scale, args.out, s
        )
        for variant in VARIANTS
        for mode in VARIANTS[variant]
        for s in range(args.seeds if mode != "zero_shot" else 1)
    }

    def report_now() -> dict:
        variants = {}
        for variant in VARIANTS:
            summaries = {
                mode: [
                    reproduce.recorded_summary(configs[variant, mode, s], cell_key(variant, mode), mode, record)
                    for s in range(args.seeds if mode != "zero_shot" else 1)
                ]
                for mode in VARIANTS[variant]
            }
            variants[variant] = variant_report(variant, summaries)
        report = {"settings": {"base_config": args.config, **scale, "seeds": args.seeds}, "variants": variants}
        report["claims"] = claims(report)
        atomic_write_text(args.record / "domains.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(record / "table.md", table(report))
        plot(report, args.record / "domains_accuracy_per_round.png")
        return report

    cells = [(v, m, 0) for v, m in ORDER if v in args.variants or m in SHARED]
    cells += [
        (v, m, s)
        for s in range(1, args.seeds)
        for v, m in ORDER
        if (v in args.variants or m in SHARED) and m != "zero_shot"
    ]
    report_now()
    for index, (variant, mode, seed_index) in enumerate(cells, 1):
        config = configs[variant, mode, seed_index]
        label = f"[{index}/{len(cells)}] domains {variant} {mode} seed {seed_index}"
        try:
            with stop_on_signals():
                reproduce.run_cell(config, cell_key(variant, mode), mode, record, label, state)
        except RunInterrupted as interrupt:
            mirror_dir = state / "in_progress" / reproduce.cell_name(config, cell_key(variant, mode), mode)
            print(reproduce._interrupted_line(interrupt, f"{variant} {mode}", mirror_dir), file=sys.stderr)
            return 128 + interrupt.signum
        report_now()
    print((record / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
