"""Wall time per round of the Flower backend against the in-process one, on the same config.

For each config it runs `fedmkt fit` (in-process) and `fedmkt launch-local` (a SuperLink and one
SuperNode per client on this machine) with the same seed and settings, then reads each round's
`wall_seconds` from the two summary.json files and prints them side by side with the overhead
Flower adds. Zero-shot evaluation is switched off, so the times are those of the rounds alone.
Both runs use this machine's cores; in-process parties take turns, while on Flower the clients
run at the same time, so on a machine with few cores the Flower clients compete for them.

    python benchmarks/flower_overhead.py                       # tiny.yaml and demo.yaml
    python benchmarks/flower_overhead.py --configs tiny --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--configs", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedmkt-flower-overhead-"))
    print("| config | round | in-process s | flower s | flower overhead |")
    print("|---|---|---|---|---|")
    for config in args.configs:
        inprocess, inprocess_total = run("fit", config, out / config / "inprocess", args.rounds)
        flower, flower_total = run("launch-local", config, out / config / "flower", args.rounds)
        for ours, theirs in zip(flower["rounds"], inprocess["rounds"]):
            a, b = theirs["wall_seconds"], ours["wall_seconds"]
            print(f"| {config} | {ours['round']} | {a:.1f} | {b:.1f} | {100 * (b - a) / a:+.0f} % |")
        print(
            f"| {config} | whole command | {inprocess_total:.1f} | {flower_total:.1f} | {100 * (flower_total - inprocess_total) / inprocess_total:+.0f} % |"
        )
    print(f"\nruns and their logs: {out}")


if __name__ == "__main__":
    main()
