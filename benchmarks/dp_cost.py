"""What DP-SGD costs in accuracy: a client's private fine-tuning at two epsilons, against none.

SmolLM2-135M (demo.yaml's client, its learning rate and batch size) fine-tuned for one round on a
private part of the embedded ARC-Easy split, then scored on the same held-out questions: without
DP, with DP-SGD at epsilon 8 and at epsilon 1 (delta 1e-5, gradients clipped to norm 1, LoRA
parameters only; `privacy.dp`). Each row gives the accuracy with its 95 % Wilson interval, the
epsilon the accountant reports, and the difference to the no-DP row with a paired bootstrap
interval over the same questions.

    OMP_NUM_THREADS=2 python benchmarks/dp_cost.py     # writes benchmarks/results/dp_cost.json
    python benchmarks/dp_cost.py --scale quick         # the same steps in minutes

Each run is stored in `--state-dir` (default `$FEDMKT_CACHE/dp_cost`, else `~/.cache/fedmkt/dp_cost`)
as soon as it ends, so the command resumes where it stopped. DP-SGD draws its noise and batches
from the operating system's entropy, so a DP row differs from run to run by about its interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Optional

from kd_transfer import SMOLLM2, Bench, cached, eval_scores, machine, release

from fedmkt.config import DPConfig, ModelSpec, RunConfig, parse_run_config
from fedmkt.data.parts import party_data
from fedmkt.evaluation import paired_bootstrap
from fedmkt.federation.parties import build_participant, quiet_lightning
from fedmkt.files import atomic_write_text
from fedmkt.models import cache_root

SCALES = {
    "full": {"eval_size": 1000, "private_size": 300},
    "quick": {"eval_size": 40, "private_size": 24},
}
EPSILONS: tuple[Optional[float], ...] = (None, 8.0, 1.0)
"""None: no DP (the baseline every DP row is compared with)."""
PUBLIC_SIZE = 8
"""The split needs a public part; this benchmark does not use it."""


def base_config(scale: str) -> RunConfig:
    """demo.yaml, one client (SmolLM2), one round, its private part of `private_size` questions."""
    sizes = SCALES[scale]
    config = parse_run_config(
        [
            "--config",
            "demo",
            "--logging.wandb",
            "false",
            "--logging.csv",
            "false",
            "--federation.rounds",
            "1",
            "--data.eval_size",
            str(sizes["eval_size"]),
            "--data.public_size",
            str(PUBLIC_SIZE),
            "--data.pool_size",
            str(PUBLIC_SIZE + sizes["private_size"]),
        ]
    )
    config.clients = config.clients[:1]
    config.clients[0].model = ModelSpec(source=SMOLLM2, dtype="float32")
    config.clients[0].trainer.enable_progress_bar = True
    return config


def row_name(epsilon: Optional[float]) -> str:
    return "no_dp" if epsilon is None else f"epsilon_{epsilon:g}"


def run(scale: str, state: Path) -> dict:
    quiet_lightning()
    bench = Bench(scale, base_config(scale), state / scale)
    bench.state.mkdir(parents=True, exist_ok=True)
    data = party_data(bench.config, "client_0")
    print(f"[dp_cost] {len(data.private)} private, {len(data.evaluation)} held-out questions; state in {bench.state}")
    rows = {}
    for epsilon in EPSILONS:
        config = deepcopy(bench.config)
        config.run_dir = str(bench.state / "runs")
        if epsilon is not None:
            config.privacy.dp = DPConfig(enabled=True, target_epsilon=epsilon)
        name = bench.key(row_name(epsilon), config.clients[0], config.privacy)

        def compute(config: RunConfig = config) -> dict:
            party = build_participant(config, "client_0", data=data)
            stats = party.fine_tune(1)
            scores = eval_scores(party.evaluate())
            release(party)
            return scores | {"task_loss": stats.task_loss, "dp_epsilon": stats.dp_epsilon, "dp_delta": stats.dp_delta}

        rows[row_name(epsilon)] = cached(bench, name, compute)
    return report(bench, len(data.private), rows)


def report(bench: Bench, n_private: int, rows: dict) -> dict:
    """The JSON written: each row's accuracy and interval, its epsilon, and its difference to no DP."""
    baseline = rows["no_dp"]["eval_correct"]
    out = {}
    for name, row in rows.items():
        entry = {
            "accuracy": row["eval_accuracy"],
            "ci": row["eval_accuracy_ci"],
            "dp_epsilon": row["dp_epsilon"],
            "dp_delta": row["dp_delta"],
            "seconds": row["seconds"],
        }
        if name != "no_dp":
            diff, interval = paired_bootstrap(row["eval_correct"], baseline)
            entry["diff_vs_no_dp"] = {"diff": diff, "ci": interval}
        out[name] = entry
    return {
        "settings": {"scale": bench.scale, "model": SMOLLM2, "date": time.strftime("%Y-%m-%d"), "machine": machine()},
        "n_eval": len(baseline),
        "n_private": n_private,
        "rows": out,
    }


def table(result: dict) -> str:
    lines = [
        f"SmolLM2-135M, one round on {result['n_private']} private ARC-Easy questions; n = {result['n_eval']} held-out.",
        "",
        "| private fine-tuning | ε (δ) | accuracy % [95 % CI] | − no DP, points [95 % CI] |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        eps = "–" if row["dp_epsilon"] is None else f"{row['dp_epsilon']:.2f} ({row['dp_delta']:g})"
        acc = f"{100 * row['accuracy']:.1f} [{100 * row['ci'][0]:.1f}, {100 * row['ci'][1]:.1f}]"
        diff = row.get("diff_vs_no_dp")
        gap = (
            "–"
            if diff is None
            else f"{100 * diff['diff']:+.1f} [{100 * diff['ci'][0]:+.1f}, {100 * diff['ci'][1]:+.1f}]"
        )
        lines.append(f"| {name.replace('_', ' ')} | {eps} | {acc} | {gap} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--state-dir", type=Path, default=None, help="where each run's result is kept")
    args = parser.parse_args(argv)
    state = args.state_dir or cache_root() / "dp_cost"
    result = run(args.scale, state)
    out = (
        Path(__file__).parent / "results" / "dp_cost.json"
        if args.scale == "full"
        else state / args.scale / "dp_cost.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(table(result))
    print(f"[dp_cost] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
