"""How much faster a FedMKT round runs with fedmkt's fast paths than on the plain paths they replaced.

One round of the embedded scenario (demo.yaml: Gemma-3-270M server, two SmolLM2-135M clients,
ARC-Easy) at the reproduction's scale (1,000 held-out questions, public and private parts of 300),
run twice in this process: with every fast path of `fedmkt.fastpaths` on, then with the ones named
by `--off` off (default: all of them, i.e. the code path before them). Prints the wall time of each
phase of each party from the round's timeline, the ratios, and whether the two runs agree: the same
per-question results (`eval_correct`) for every party and the same losses (within `--loss-rtol`).

    OMP_NUM_THREADS=2 python benchmarks/round_speed.py           # the reproduction's scale (about 45 min on 2 cores)
    python benchmarks/round_speed.py --quick                     # the same comparison in under 10 minutes
    python benchmarks/round_speed.py --off chunked_head          # one fast path against the rest
    OMP_NUM_THREADS=2 python benchmarks/round_speed.py --work-dir runs/round_speed   # resumable: a rerun reuses finished rounds (new folder after a code change)

The last line reads `round speedup: X.XX× (results identical: yes|no)`.

`--unlabelled` measures instead what a public set without labels costs: a labelled round and one
with `data.public_labels: false` (each party answers the public questions itself), both on the
fast paths, in one command. Its last line reads `unlabelled round cost: X.XX× a labelled round`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch

from fedmkt.config import parse_run_config
from fedmkt.fastpaths import FastPaths, plain
from fedmkt.run import fit

SCALES = {"full": {"eval_size": 1000, "part_size": 300}, "quick": {"eval_size": 60, "part_size": 32}}
PHASES = ("fine_tune", "share_knowledge", "distill", "evaluate")


def run_once(scale: dict, run_dir: Path, off: tuple[str, ...], unlabelled: bool = False) -> dict:
    """One round of demo.yaml at `scale` with the fast paths in `off` turned off (and the public
    set read without its answers with `unlabelled`); its summary."""
    config = parse_run_config(
        [
            *(["--data.public_labels", "false"] if unlabelled else []),
            "--config",
            "demo",
            "--data.eval_size",
            str(scale["eval_size"]),
            "--data.pool_size",
            str(3 * scale["part_size"]),
            "--federation.rounds",
            "1",
            "--federation.evaluate_before",
            "false",
            "--logging.wandb",
            "false",
            "--run_dir",
            str(run_dir),
        ]
    )
    for party in config.parties().values():
        party.trainer.enable_progress_bar = False
    with plain(*off) if off else contextlib.nullcontext():
        return fit(config, overwrite=run_dir.exists())


def _record_path(work: Path, name: str) -> Path:
    return work / f"{name}_round.json"


def record_round(work: Path, name: str, scale: dict, off: tuple[str, ...], summary: dict) -> None:
    """Keep a finished round's summary beside its folder, so that a rerun with the same
    `--work-dir` resumes after it instead of running it again."""
    _record_path(work, name).write_text(json.dumps({"scale": scale, "off": list(off), "summary": summary}))


def finished_round(work: Path, name: str, scale: dict, off: tuple[str, ...]) -> Optional[dict]:
    """The summary of this round from an earlier run in `work` at the same scale and paths, if any."""
    path = _record_path(work, name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("scale") != scale or record.get("off") != list(off):
        return None
    return record["summary"]


def unlabelled_cost(scale: dict, work: Path, out: Optional[Path]) -> int:
    """A labelled round and an unlabelled one on the fast paths: per-phase seconds and the round's ratio."""
    summaries = {}
    for name in ("labelled", "unlabelled"):
        summaries[name] = finished_round(work, name, scale, ())
        if summaries[name] is None:
            print(f"round_speed: running the {name} round", flush=True)
            summaries[name] = run_once(scale, work / name, (), unlabelled=name == "unlabelled")
            record_round(work, name, scale, (), summaries[name])
        else:
            print(f"round_speed: reusing the {name} round finished earlier in {work / name}", flush=True)
    labelled, unlabelled = phase_seconds(summaries["labelled"]), phase_seconds(summaries["unlabelled"])
    print("\n| party | phase | labelled s | unlabelled s | cost |")
    print("|---|---|---|---|---|")
    rows = []
    for key in sorted(labelled, key=lambda k: (k[0] != "server", k[0], PHASES.index(k[1]))):
        ratio = unlabelled.get(key, float("nan")) / labelled[key]
        rows.append(
            {"party": key[0], "phase": key[1], "labelled_s": labelled[key], "unlabelled_s": unlabelled.get(key)}
        )
        print(f"| {key[0]} | {key[1]} | {labelled[key]:.1f} | {unlabelled.get(key, float('nan')):.1f} | {ratio:.2f}× |")
    walls = {name: summaries[name]["rounds"][0]["wall_seconds"] for name in summaries}
    cost = walls["unlabelled"] / walls["labelled"]
    print(f"| whole round | | {walls['labelled']:.1f} | {walls['unlabelled']:.1f} | {cost:.2f}× |")
    if out is not None:
        record = {"scale": scale, "machine": machine(), "phases": rows, "round_seconds": walls, "cost": cost}
        out.write_text(json.dumps(record, indent=1))
    print(f"unlabelled round cost: {cost:.2f}× a labelled round")
    return 0


def phase_seconds(summary: dict) -> dict[tuple[str, str], float]:
    """(party, phase) -> seconds spent in that phase in the round (phases a party ran twice add up)."""
    seconds: dict[tuple[str, str], float] = {}
    for party, entry in summary["rounds"][0]["parties"].items():
        for span in entry.get("timeline", []):
            if span["phase"] in PHASES:
                key = (party, span["phase"])
                seconds[key] = seconds.get(key, 0.0) + span["end"] - span["start"]
    return seconds


def agreement(fast: dict, slow: dict, loss_rtol: float) -> tuple[bool, list[str]]:
    """Whether both runs give the same per-question results and losses, with what differs."""
    differences = []
    for party, a in fast["rounds"][0]["parties"].items():
        b = slow["rounds"][0]["parties"][party]
        if a.get("eval_correct") != b.get("eval_correct"):
            flipped = sum(x != y for x, y in zip(a["eval_correct"], b["eval_correct"]))
            differences.append(f"{party}: {flipped} of {len(a['eval_correct'])} questions answered differently")
        for key in ("task_loss", "kd_loss"):
            x, y = a.get(key), b.get(key)
            if x is not None and y is not None and abs(x - y) > loss_rtol * max(abs(y), 1e-12):
                differences.append(f"{party}: {key} {x:.6f} vs {y:.6f}")
        if a.get("selected") != b.get("selected"):
            differences.append(f"{party}: selected {a.get('selected')} vs {b.get('selected')}")
    return not differences, differences


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def main(argv: Optional[list[str]] = None) -> int:
    names = [f.name for f in fields(FastPaths)]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small round (eval 60, parts of 32)")
    parser.add_argument("--off", nargs="+", choices=names, default=names, help="fast paths the baseline turns off")
    parser.add_argument("--loss-rtol", type=float, default=1e-3, help="relative tolerance for the phase losses")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the two runs' folders go; rerun with the same one to resume after a finished round "
        "(use a new one once the code has changed)",
    )
    parser.add_argument(
        "--unlabelled", action="store_true", help="compare a round on an unlabelled public set with a labelled one"
    )
    args = parser.parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="round_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.unlabelled:
        print(f"round_speed: {'quick' if args.quick else 'full'} scale {scale}; labelled against unlabelled public set")
        print(f"machine: {machine()}; run folders in {work}", flush=True)
        return unlabelled_cost(scale, work, args.out)
    print(f"round_speed: {'quick' if args.quick else 'full'} scale {scale}; plain paths: {', '.join(args.off)}")
    print(f"machine: {machine()}; run folders in {work}", flush=True)
    summaries, walls = {}, {}
    for name, off in (("plain", tuple(args.off)), ("fast", ())):
        summaries[name] = finished_round(work, name, scale, off)
        if summaries[name] is not None:
            print(f"round_speed: reusing the {name} round finished earlier in {work / name}", flush=True)
        else:
            print(f"round_speed: running the {name} round", flush=True)
            start = time.perf_counter()
            summaries[name] = run_once(scale, work / name, off)
            record_round(work, name, scale, off, summaries[name])
            print(f"round_speed: {name} round done in {time.perf_counter() - start:.0f} s", flush=True)
        walls[name] = summaries[name]["rounds"][0]["wall_seconds"]
    fast, slow = phase_seconds(summaries["fast"]), phase_seconds(summaries["plain"])
    print("\n| party | phase | plain s | fast s | speedup |")
    print("|---|---|---|---|---|")
    rows = []
    for key in sorted(slow, key=lambda k: (k[0] != "server", k[0], PHASES.index(k[1]))):
        party, phase = key
        ratio = slow[key] / fast[key] if fast.get(key) else float("nan")
        rows.append({"party": party, "phase": phase, "plain_s": slow[key], "fast_s": fast.get(key), "speedup": ratio})
        print(f"| {party} | {phase} | {slow[key]:.1f} | {fast.get(key, float('nan')):.1f} | {ratio:.2f}× |")
    speedup = walls["plain"] / walls["fast"]
    print(f"| whole round | | {walls['plain']:.1f} | {walls['fast']:.1f} | {speedup:.2f}× |")
    same, differences = agreement(summaries["fast"], summaries["plain"], args.loss_rtol)
    for line in differences:
        print(f"differs: {line}")
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "scale": scale,
                    "plain_paths": args.off,
                    "machine": machine(),
                    "phases": rows,
                    "round_seconds": walls,
                    "speedup": speedup,
                    "results_identical": same,
                    "differences": differences,
                },
                indent=1,
            )
        )
    print(f"round speedup: {speedup:.2f}× (results identical: {'yes' if same else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
