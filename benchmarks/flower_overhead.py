"""Wall time per round of the Flower backend against the in-process one, on the same config, and
how long a Flower message takes to start its phase.

For each config it runs `fedmkt fit` (in-process) and `fedmkt launch-local` (a SuperLink and one
SuperNode per client on this machine) with the same seed and settings, then reads each round's
`wall_seconds` from the two summary.json files and prints them side by side with the overhead
Flower adds. Zero-shot evaluation is switched off, so the times are those of the rounds alone.
Both runs use this machine's cores; in-process parties take turns, while on Flower the clients
run at the same time, so on a machine with few cores the Flower clients compete for them.

Latency: every phase a message starts carries in its timeline the time the server sent the message
(`sent`) and the time the node started the phase (`start`, one machine: one clock); the second
table gives their difference per config, median and max over all messages of the run.

    python benchmarks/flower_overhead.py                       # tiny.yaml (3 rounds) and demo.yaml
    python benchmarks/flower_overhead.py --configs tiny:3         # NAME:ROUNDS overrides federation.rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: str, config: str, run_dir: Path, rounds: int | None) -> tuple[dict, float]:
    """One run of `fedmkt COMMAND` (its summary and wall time); its output goes to run_dir.log."""
    args = [sys.executable, "-m", "fedmkt.cli", command, "--config", config, "--run_dir", str(run_dir)]
    args += ["--federation.evaluate_before", "false", "--logging.wandb", "false"]
    if rounds is not None:
        args += ["--federation.rounds", str(rounds)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(f"{run_dir}.log", "w") as log:
        code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, WANDB_MODE="offline"))
    seconds = time.monotonic() - started
    if code != 0:
        sys.exit(f"flower_overhead: `fedmkt {command} --config {config}` failed (exit {code}); see {run_dir}.log")
    return json.loads((run_dir / "summary.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", nargs="+", default=["tiny:3", "demo"], help="configs to run, each NAME or NAME:ROUNDS"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedmkt-flower-overhead-"))
    latencies: dict[str, list[tuple[float, str]]] = {}
    print("| config | round | in-process s | flower s | flower overhead |")
    print("|---|---|---|---|---|")
    for entry in args.configs:
        config, _, rounds = entry.partition(":")
        inprocess, inprocess_total = run("fit", config, out / config / "inprocess", int(rounds) if rounds else None)
        flower, flower_total = run("launch-local", config, out / config / "flower", int(rounds) if rounds else None)
        for ours, theirs in zip(flower["rounds"], inprocess["rounds"]):
            a, b = theirs["wall_seconds"], ours["wall_seconds"]
            print(f"| {config} | {ours['round']} | {a:.1f} | {b:.1f} | {100 * (b - a) / a:+.0f} % |")
        print(
            f"| {config} | whole command | {inprocess_total:.1f} | {flower_total:.1f} | {100 * (flower_total - inprocess_total) / inprocess_total:+.0f} % |"
        )
        latencies[config] = message_latencies(flower)
    print("\n| config | messages | message -> phase start: median s | max s | slowest |")
    print("|---|---|---|---|---|")
    for config, waits in latencies.items():
        if not waits:
            print(f"| {config} | 0 | – | – | – |")
            continue
        slowest = max(waits, key=lambda wait: wait[0])
        print(
            f"| {config} | {len(waits)} | {statistics.median(w for w, _ in waits):.2f} | {slowest[0]:.2f} | {slowest[1]} |"
        )
    print(f"\nruns and their logs: {out}")


def message_latencies(summary: dict) -> list[tuple[float, str]]:
    """(seconds from the server sending a message to the node starting its phase, "round party phase")
    for every message of the run (phases that ran right after another in the same message have no `sent`)."""
    waits = []
    for record in summary["rounds"]:
        for party, stats in record.get("parties", {}).items():
            for span in stats.get("timeline", []):
                if "sent" in span:
                    waits.append((span["start"] - span["sent"], f"round {record['round']} {party} {span['phase']}"))
    return waits


if __name__ == "__main__":
    main()
