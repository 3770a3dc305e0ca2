"""Reproduce the paper's Table 2 layout at CPU scale with the embedded models.

For each task, runs the embedded scenario (server Gemma-3-270M, clients SmolLM2-135M, from
`demo.yaml`) in three modes — FedMKT (whose round-0 evaluation is the Zero-Shot column),
Standalone and Centralized — and writes:
  <out>/table.md                 Zero-Shot / Standalone / FedMKT / Centralized per party per task
  <out>/accuracy_per_round.png   FedMKT accuracy per round per party, one panel per task
  <out>/<task>/<mode>/           each run's summary.json, adapters and logs

    python benchmarks/reproduce.py --tasks arc_easy arc_challenge boolq --out runs/reproduce

Extra `--override KEY=VALUE` pairs go to every run (e.g. `--override federation.rounds=3`).
`--modes` runs part of the grid, so several processes can share it; finished runs are reused, so a
last call with all modes only assembles the table. On a 2-core machine give each process one
thread (`OMP_NUM_THREADS=1`): two 2-thread torch processes slow each other down several-fold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmkt.config import parse_run_config
from fedmkt.run import fit

MODES = ("fedmkt", "standalone", "centralized")


def run(base: str, task: str, mode: str, out: Path, overrides: list[str]) -> dict:
    """One federated run; reuses a finished run's summary if present (so the script can resume)."""
    run_dir = out / task / mode
    summary_path = run_dir / "summary.json"
    config = parse_run_config(
        [
            "--config",
            base,
            "--data.task",
            task,
            "--federation.mode",
            mode,
            "--run_dir",
            str(run_dir),
            "--logging.wandb",
            "false",
        ]
        + [f"--{item.split('=', 1)[0]}={item.split('=', 1)[1]}" for item in overrides]
    )
    if mode != "fedmkt":
        config.federation.evaluate_before = False  # the FedMKT run's round 0 is the zero-shot column
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if len(summary["rounds"]) == config.federation.rounds:
            return summary
    start = time.perf_counter()
    summary = fit(config)
    summary["wall_seconds"] = time.perf_counter() - start
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def final_accuracy(summary: dict, party: str) -> float | None:
    for record in reversed(summary["rounds"]):
        accuracy = record["parties"].get(party, {}).get("eval_accuracy")
        if accuracy is not None:
            return accuracy
    return None


def cell(values: list[float | None]) -> str:
    return "/".join("–" if v is None else f"{100 * v:.1f}" for v in values)


def table(results: dict[str, dict[str, dict]], parties: list[str]) -> str:
    lines = [
        f"Accuracy (%) per party: {'/'.join(parties)}.",
        "",
        "| task | Zero-Shot | Standalone | FedMKT | Centralized (server) |",
        "|---|---|---|---|---|",
    ]
    for task, runs in results.items():
        fedmkt = runs["fedmkt"]
        zero_shot = [fedmkt["zero_shot"].get(p, {}).get("eval_accuracy") for p in parties]
        standalone = [final_accuracy(runs["standalone"], p) if p != "server" else None for p in parties]
        federated = [final_accuracy(fedmkt, p) for p in parties]
        centralized = final_accuracy(runs["centralized"], "server")
        lines.append(f"| {task} | {cell(zero_shot)} | {cell(standalone)} | {cell(federated)} | {cell([centralized])} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], parties: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (task, runs) in zip(axes[0], results.items()):
        summary = runs["fedmkt"]
        for party in parties:
            rounds = [0] + [r["round"] for r in summary["rounds"]]
            accuracy = [summary["zero_shot"][party]["eval_accuracy"]] + [
                r["parties"][party].get("eval_accuracy") for r in summary["rounds"]
            ]
            axis.plot(rounds, [100 * a for a in accuracy], marker="o", label=party)
        centralized = final_accuracy(runs["centralized"], "server")
        if centralized is not None:
            axis.axhline(100 * centralized, linestyle="--", color="grey", label="server, centralized")
        axis.set(title=task, xlabel="round", ylabel="accuracy (%)", xticks=rounds)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="base config (demo: real models; tiny: a quick smoke run)")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "boolq"])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--override", nargs="*", default=[], help="KEY=VALUE config overrides for every run")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="run only these modes (e.g. to split the grid over processes); the table needs all three",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {
        task: {mode: run(args.config, task, mode, args.out, args.override) for mode in args.modes}
        for task in args.tasks
    }
    if set(args.modes) != set(MODES):
        print(
            f"ran {', '.join(args.modes)} for {', '.join(args.tasks)} in {time.perf_counter() - start:.0f} s; rerun with all modes for the table"
        )
        return
    parties = list(next(iter(results.values()))["fedmkt"]["zero_shot"])
    markdown = table(results, parties)
    (args.out / "table.md").write_text(markdown + "\n")
    plot(results, parties, args.out / "accuracy_per_round.png")
    print(markdown)
    print(f"\nwall time: {time.perf_counter() - start:.0f} s; figure: {args.out / 'accuracy_per_round.png'}")


if __name__ == "__main__":
    main()
