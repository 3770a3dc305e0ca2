"""Reproduce the paper's Table 2 at a scale that can tell a gain from noise, on the embedded scenario.

The embedded scenario (`demo.yaml`: server Gemma-3-270M, two SmolLM2-135M clients) runs in six
modes on the same held-out questions:

  zero_shot      the base models
  standalone     each client fine-tunes on its private part only
  fedmkt         the method (evaluated after every round: the per-round figure)
  centralized    the server trains on the public and all private parts
  fedmkt_no_kd   FedMKT with lambda = 1: the public labels without the KD term
  llm2slm        the server is frozen; clients distill from it one way

Every accuracy comes with its 95 % Wilson interval, and every FedMKT-minus-baseline difference with
a paired bootstrap interval over the same questions (the runs record which questions each party got
right). Outputs:

  <record>/reproduction.json        settings, wall time, accuracies, intervals, differences
  <record>/reproduction/table.md    the same as tables, plus every recorded try
  <record>/reproduction/accuracy_per_round.png
  <record>/reproduction/runs/       each finished run's summary, named by task, mode and settings hash
  <record>/reproduction/tries/NAME/   a tuning try's report (see --try)
  <out>/<task>/<mode>-<hash>/       each run's folder (adapters, round checkpoints, logs)
  <state>/in_progress/<cell>/       the last round checkpoint of each unfinished run (see --state-dir)

    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --tasks arc_easy boolq

The grid resumes where it stopped: a run whose summary is recorded under the same settings is
reused, a run killed mid-way continues from its last round checkpoint, and one killed before its
first checkpoint starts over. Each round checkpoint is mirrored into `--state-dir` (default
`$FEDMKT_CACHE/reproduce`, else `~/.cache/fedmkt/reproduce`; adapters, cached losses, RNG state:
about 10 MB a cell), outside the repository and outside `--out`, so the grid may span several
sittings: copy that folder to continue on another machine. Only results (JSON, tables, the figure)
are written into the repository. SIGTERM or Ctrl-C stops it at once, in
any phase, with one line naming the checkpoint that the same command continues from (exit code
143 / 130). `--modes` and `--tasks` run
part of it; every call rewrites the outputs from what has finished (missing cells are listed).
Extra `--override KEY=VALUE` pairs go to every run. They change the settings hash only of the modes
that read the key (Zero-Shot reads no training setting, Standalone no transfer setting, ...), so a
tuning try reruns only what its change can move and reuses the rest. `--try NAME` writes such a try's
report to `<record>/reproduction/tries/NAME/` and lists it in the main table:

    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --tasks arc_easy --try kd-answer \
        --override transfer.kd_positions=answer

`clients.N.KEY=VALUE` sets one client's setting (`clients.0.optimizer.lr=1e-4`).

On a 2-core machine give each process one thread: two multi-threaded torch processes slow each
other down several-fold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from fedmkt.config import RunConfig, parse_run_config
from fedmkt.errors import RunInterrupted
from fedmkt.evaluation import paired_bootstrap, pooled_paired_bootstrap
from fedmkt.files import atomic_write_text
from fedmkt.interrupts import stop_on_signals
from fedmkt.models import cache_root
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

ADDED_LATER = {
    "data": {"public_size": None, "public_labels": None, "client_tasks": None, "eval_sets": None},
    "transfer": {"topk_target": "renormalize", "teacher": "real"},
    "privacy": {
        "dp": {"enabled": False, "max_grad_norm": 1.0, "noise_multiplier": None, "target_epsilon": None, "delta": 1e-5}
    },
}
"""Keys added to the config after runs were recorded, with the value that does what the code did
before them: at that value they are left out of the settings hash, so every run recorded before
them keeps its hash."""

PARTY_KEYS_ADDED_LATER = {"optimizer": {"schedule": "phase"}}
"""Party keys added later, with the value that does what the code did before them (each phase its
own learning-rate schedule): left out of the hash at that value, and what a record without them ran."""


def as_run_then(config: dict) -> dict:
    """A recorded config with every party key added later set to what the code did when it ran."""
    config = json.loads(json.dumps(config))
    for party in [config["server"], *config["clients"]]:
        for part, defaults in PARTY_KEYS_ADDED_LATER.items():
            for key, value in defaults.items():
                party.setdefault(part, {}).setdefault(key, value)
    return config


KD_OBJECTIVE = "per-sample, selection per byte"
"""How the KD term is weighted against CE (`fedmkt.losses.loss_weights`: per-sample means, KD x T^2)
and how DualMinCE compares losses (NLL per UTF-8 byte of the answer). Part of the settings of every
run whose KD term is on, and stored in its record: a record without it, or with an earlier value
("per-sample": token-mean losses; none: KD summed over the batch's eligible positions), was run by
earlier code, so it is never reused for a run of today's code."""


SELECTION_SCORE = "distilled positions"
"""What DualMinCE scores (`fedmkt.selection.scored_targets`): every position the receiver distills,
prompt included under `kd_positions: all`. Part of the settings of every run that selects under
`all`, and stored in its record: a record without it scored the answer alone, so it is never
reused for a run of today's code (under `kd_positions: answer` the score did not change)."""


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


SEED_STRIDE = 100
"""Seed `s` of a cell trains with `training_seed = seed + SEED_STRIDE * s` (seed 0: the config's own
seed): the split stays fixed, and no two seeds share a party's LoRA-init or phase seed."""


def seed_arguments(base_seed: int, seed_index: int) -> list[str]:
    """The override that makes a run seed `seed_index` of its cell (none for seed 0)."""
    return [] if seed_index == 0 else ["--training_seed", str(base_seed + SEED_STRIDE * seed_index)]


def grid_config(
    base: str, task: str, mode: str, scale: dict, out: Path, overrides: list[str], seed_index: int = 0
) -> RunConfig:
    """The RunConfig of one cell: base config, task, scale, the user's overrides, then the mode.

    The mode's own settings come last, so an override cannot turn one mode into another (a
    `transfer.ce_weight` try keeps the lambda = 1 control at lambda = 1)."""
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
        "--logging.wandb",
        "false",
    ]
    for item in overrides:  # `clients.N.KEY=VALUE` sets one client's key (`fedmkt.config.expand_client_overrides`)
        key, _, value = item.partition("=")
        arguments += [f"--{key}", value]
    arguments += mode_arguments(mode)
    arguments += seed_arguments(parse_run_config(arguments).seed, seed_index)
    config = parse_run_config(arguments)
    # One folder per settings, so tries of other settings (even running side by side) never meet.
    config.run_dir = str(out / task / f"{mode}-{settings_hash(config)}")
    return config


POOL_KEYS = ("pool_size", "public_size")
"""Data keys that carve the training pool: the held-out questions do not depend on them."""

TRAINING_KEYS = ("optimizer", "batch_size", "local_epochs", "distill_epochs")
"""A party's keys that only matter when it trains."""

KD_KEYS = ("top_k", "temperature", "kd_loss", "selection", "kd_positions", "topk_target", "sequence_alignment")
"""Transfer keys that only shape the KD term (lambda < 1)."""


def _unread_keys(tree: dict) -> dict[str, tuple[str, ...]]:
    """Keys a run of this config never reads, per part (`transfer`, `privacy`, `server`, `clients`, ...).

    A mode leaves parts of the config unused (Zero-Shot trains nobody, Standalone never transfers,
    lambda = 1 has no KD term); leaving them out of the settings hash lets a tuning try reuse every
    recorded run that its changed keys cannot affect.
    """
    mode = tree["federation"]["mode"]
    no_kd = mode == "fedmkt" and float(tree["transfer"]["ce_weight"]) == 1.0
    everything = tuple(tree["transfer"])
    if mode == "zero_shot":
        return {
            "data": (*POOL_KEYS, "public_labels"),
            "transfer": everything,
            "privacy": tuple(tree["privacy"]),
            "federation": ("rounds",),
            "server": TRAINING_KEYS,
            "clients": TRAINING_KEYS,
        }
    if mode == "standalone":
        return {
            "data": ("public_labels",),
            "transfer": everything,
            "privacy": tuple(tree["privacy"]),
            "server": TRAINING_KEYS,
            "clients": ("distill_epochs",),
        }
    if mode == "centralized":
        return {
            "transfer": everything,
            "privacy": tuple(tree["privacy"]),
            "server": ("distill_epochs",),
            "clients": TRAINING_KEYS,
        }
    if mode == "llm2slm":
        return {"server": TRAINING_KEYS}
    if no_kd:
        return {"transfer": KD_KEYS}
    return {}


def distills(config: RunConfig | dict) -> bool:
    """Whether a run of this config has a KD term (some party distills with lambda < 1)."""
    tree = asdict(config) if isinstance(config, RunConfig) else config
    mode = tree["federation"]["mode"]
    return mode in ("fedmkt", "fedavg", "llm2slm") and float(tree["transfer"]["ce_weight"]) < 1.0


def selects(config: RunConfig | dict) -> bool:
    """Whether a run of this config selects public samples by scoring prompt positions too (DualMinCE under `kd_positions: all`)."""
    tree = asdict(config) if isinstance(config, RunConfig) else config
    return (
        tree["federation"]["mode"] in ("fedmkt", "fedavg", "llm2slm")
        and tree["transfer"].get("kd_positions", "all") == "all"
    )


def settings_of(
    config: RunConfig | dict,
    kd_objective: Optional[str] = KD_OBJECTIVE,
    selection_score: Optional[str] = SELECTION_SCORE,
) -> dict:
    """The config as JSON, without the keys that do not change this run's results.

    `kd_objective` is the KD weighting the run used (`KD_OBJECTIVE` for today's code, None for a
    record made before it was stored); it is part of the settings only where the KD term is on.
    `selection_score` likewise (`SELECTION_SCORE`), where `selects`.
    """
    tree = asdict(config) if isinstance(config, RunConfig) else config
    tree = json.loads(json.dumps(tree, default=str))
    active_kd = distills(tree)
    for part, keys in _unread_keys(tree).items():
        for section in tree[part] if part == "clients" else [tree[part]]:
            for key in keys:
                section.pop(key, None)
    for part, defaults in ADDED_LATER.items():
        for key, value in defaults.items():
            if key in tree[part] and tree[part][key] == value:
                tree[part].pop(key)
    for party in [tree["server"], *tree["clients"]]:
        for part, defaults in PARTY_KEYS_ADDED_LATER.items():
            for key, value in defaults.items():
                if party.get(part, {}).get(key) == value:
                    party[part].pop(key)
    settings = {key: value for key, value in tree.items() if key not in IGNORED_SETTINGS}
    if settings.get("training_seed") is None:  # the config's seed: as every run before the key existed
        settings.pop("training_seed", None)
    if active_kd and kd_objective is not None:
        settings["kd_objective"] = kd_objective
    if selects(tree) and selection_score is not None:
        settings["selection_score"] = selection_score
    return settings


def settings_hash(
    config: RunConfig | dict,
    kd_objective: Optional[str] = KD_OBJECTIVE,
    selection_score: Optional[str] = SELECTION_SCORE,
) -> str:
    settings = settings_of(config, kd_objective, selection_score)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def finished(
    summary: dict,
    config: RunConfig,
    kd_objective: Optional[str] = KD_OBJECTIVE,
    selection_score: Optional[str] = SELECTION_SCORE,
) -> bool:
    """Whether `summary` is a complete run of exactly `config`'s settings.

    `kd_objective`: the KD weighting the summary's run used (a record says which in its own
    `kd_objective`; a run folder named by today's settings hash holds a run of today's code).
    """
    recorded = summary.get("config", {})
    if not recorded or settings_of(recorded, kd_objective, selection_score) != settings_of(config):
        return False
    if config.federation.mode == "zero_shot":
        return bool(summary.get("zero_shot"))
    return len(summary.get("rounds", [])) == config.federation.rounds


def cell_name(config: RunConfig, task: str, mode: str) -> str:
    """`task-mode-hash`: names a cell's record in `runs/` and its checkpoint mirror in `in_progress/`."""
    return f"{task}-{mode}-{settings_hash(config)}"


def recorded_summary(config: RunConfig, task: str, mode: str, record: Path) -> Optional[dict]:
    """The recorded summary of this exact cell, if a finished one is in `record`."""
    recorded = record / "runs" / f"{cell_name(config, task, mode)}.json"
    if recorded.is_file():
        summary = json.loads(recorded.read_text())
        if finished(summary, config, summary.get("kd_objective"), summary.get("selection_score")):
            return summary
    return None


def run_cell(config: RunConfig, task: str, mode: str, record: Path, label: str, state: Path) -> dict:
    """One grid cell: reused when recorded, resumed from its round checkpoint (mirrored in `state`), or run."""
    name = cell_name(config, task, mode)
    recorded = record / "runs" / f"{name}.json"
    summary = recorded_summary(config, task, mode, record)
    if summary is not None:
        print(f"{label}: reused {recorded}", flush=True)
        return summary
    run_dir = Path(config.run_dir)
    mirror_dir = state / "in_progress" / name
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and finished(json.loads(summary_path.read_text()), config):
        summary = json.loads(summary_path.read_text())
        # Finished outside this script: from the run folder's first and last writes.
        summary["wall_seconds"] = summary_path.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    else:
        earlier = restore_mirror(mirror_dir, run_dir)
        resume = str(run_dir) if (run_dir / "checkpoint" / "checkpoint.json").is_file() else None
        where = f"resuming {run_dir} ({earlier:.0f} s done in earlier sittings)" if resume else "running"
        print(f"{label}: {where}; per-round metrics in {run_dir / 'logs' / 'metrics.csv'}", flush=True)
        mirror = CheckpointMirror(run_dir, mirror_dir, earlier if resume else 0.0)
        mirror.start()
        try:
            summary = fit(config, resume=resume, overwrite=resume is None and run_dir.exists())
        finally:
            mirror.stop()
        summary = json.loads(json.dumps(summary, default=str))
        # Time of the work kept: earlier sittings up to their last checkpoint, plus this sitting.
        summary["wall_seconds"] = mirror.seconds()
    summary["settings_hash"] = settings_hash(config)
    if distills(config):
        summary["kd_objective"] = KD_OBJECTIVE
    if selects(config):
        summary["selection_score"] = SELECTION_SCORE
    recorded.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recorded, json.dumps(summary, indent=1, default=str))  # a grid alongside may read it
    shutil.rmtree(mirror_dir, ignore_errors=True)  # the finished record replaces the checkpoint
    print(f"{label}: done, recorded {recorded}", flush=True)
    return summary


# ---- round checkpoints that outlive the run folder ----------------------------------------------

MIRROR_RECORD = "sittings.json"
"""In a mirror folder: the round it holds and the wall seconds the run had spent when it was saved."""


class CheckpointMirror:
    """Copies a running fit's latest round checkpoint into a folder that travels with the repository.

    The run folder lives in an ignored path, so a fresh checkout would start a long run over; the
    mirror holds exactly what `--resume` reads (checkpoint/ and the last round's adapters). A copy
    is kept only if no checkpoint file changed while it was taken, and it replaces the previous
    mirror in one rename, so the mirror always holds one complete round.
    """

    def __init__(self, run_dir: Path, mirror_dir: Path, earlier_seconds: float, poll_s: float = 15.0) -> None:
        self.run_dir, self.mirror_dir = Path(run_dir), Path(mirror_dir)
        self.earlier_seconds, self.poll_s = earlier_seconds, poll_s
        self.started = time.perf_counter()
        # A resumed run starts from the round the mirror holds: copying it again would only stamp it
        # with this sitting's clock, counting time that produced nothing as time of that round.
        self._copied: Optional[tuple] = self._stamps() if self._holds_current_round() else None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.sync()  # the checkpoint of a round that ended just before fit returned or failed

    def _loop(self) -> None:
        while not self._stopped.wait(self.poll_s):
            self.sync()

    def _holds_current_round(self) -> bool:
        record, saved = self.run_dir / "checkpoint" / "checkpoint.json", self.mirror_dir / MIRROR_RECORD
        if not (record.is_file() and saved.is_file()):
            return False
        return json.loads(record.read_text())["round"] == json.loads(saved.read_text())["round"]

    def _stamps(self) -> tuple:
        folder = self.run_dir / "checkpoint"
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()))

    def sync(self) -> bool:
        """Mirror the current checkpoint if it is new; returns whether a copy was made."""
        record = self.run_dir / "checkpoint" / "checkpoint.json"
        if not record.is_file():
            return False
        before = self._stamps()
        if before == self._copied:
            return False
        round_index = int(json.loads(record.read_text())["round"])
        staging = self.mirror_dir.with_name(self.mirror_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(self.run_dir / "checkpoint", staging / "checkpoint")
        adapters = Path("adapters") / f"round_{round_index}"
        shutil.copytree(self.run_dir / adapters, staging / adapters)
        if self._stamps() != before:  # the next round's checkpoint was being written: try again later
            shutil.rmtree(staging, ignore_errors=True)
            return False
        (staging / MIRROR_RECORD).write_text(json.dumps({"round": round_index, "wall_seconds": self.seconds()}))
        previous = self.mirror_dir.with_name(self.mirror_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if self.mirror_dir.exists():
            self.mirror_dir.rename(previous)
        staging.rename(self.mirror_dir)
        shutil.rmtree(previous, ignore_errors=True)
        self._copied = before
        return True


def restore_mirror(mirror_dir: Path, run_dir: Path) -> float:
    """Put a mirrored checkpoint back into `run_dir` when the run folder lacks one (a fresh checkout).

    Returns the wall seconds the run had spent up to the mirrored checkpoint (0 without one). A run
    folder with its own checkpoint keeps it: it is at least as recent as the mirror.
    """
    record = mirror_dir / MIRROR_RECORD
    if not record.is_file():
        return 0.0
    mirrored = json.loads(record.read_text())
    own = run_dir / "checkpoint" / "checkpoint.json"
    if not (own.is_file() and int(json.loads(own.read_text())["round"]) >= int(mirrored["round"])):
        for part in ("checkpoint", Path("adapters") / f"round_{mirrored['round']}"):
            shutil.rmtree(run_dir / part, ignore_errors=True)
            shutil.copytree(mirror_dir / part, run_dir / part)
    return float(mirrored["wall_seconds"])


# ---- statistics ---------------------------------------------------------------------------------


def final_entry(summary: dict, party: str) -> Optional[dict]:
    """The party's last evaluated entry (round 0 for a zero-shot run)."""
    entries = [summary.get("zero_shot", {}).get(party)] + [r["parties"].get(party) for r in summary.get("rounds", [])]
    scored = [e for e in entries if e and e.get("eval_accuracy") is not None]
    return scored[-1] if scored else None


def cell_of(entry: dict, prefix: str = "eval") -> dict:
    """A report cell from a party's summary entry: accuracy, acc_norm, Wilson interval, n and the
    per-question record, of the held-out set `prefix` names (`eval`, `eval_arc_easy`, ...)."""
    return {
        "acc": entry[f"{prefix}_accuracy"],
        "acc_norm": entry.get(f"{prefix}_accuracy_norm"),
        "ci": list(entry[f"{prefix}_accuracy_ci"]),
        "n": entry[f"{prefix}_n"],
        "correct": entry.get(f"{prefix}_correct"),
    }


def seed_report(cells_by_seed: dict[str, dict[str, list[Optional[dict]]]], pairs: list[tuple[str, str]]) -> dict:
    """Each seed's accuracy per party and mode, and each pair's difference pooled over the seeds
    both sides finished (`pooled_paired_bootstrap`: the questions are resampled, not the seeds).

    `cells_by_seed[party][mode]` lists one cell (or None, not run yet) per seed; a mode that does not
    depend on the training seed lists the same cell for every seed."""
    report: dict = {"parties": {}, "pooled_differences": {}}
    for party, by_mode in cells_by_seed.items():
        report["parties"][party] = {
            mode: [None if cell is None else cell["acc"] for cell in cells] for mode, cells in by_mode.items()
        }
        for a, b in pairs:
            both = [
                (x["correct"], y["correct"])
                for x, y in zip(by_mode.get(a, []), by_mode.get(b, []))
                if x and y and x.get("correct") and y.get("correct")
            ]
            if not both or "same_as" in (by_mode[a][0] or {}):
                continue
            diff, ci = pooled_paired_bootstrap([x for x, _ in both], [y for _, y in both])
            report["pooled_differences"].setdefault(party, {})[f"{a}-{b}"] = {
                "diff": diff,
                "ci": ci,
                "seeds": len(both),
            }
    return report


def _held_out_settings(config: dict) -> list:
    """The settings that fix which questions a run is scored on, and how they are scored."""
    data = {key: value for key, value in config["data"].items() if key not in POOL_KEYS}
    return [config["seed"], data]


def assemble(runs: dict[str, dict[str, dict]]) -> dict:
    """`tasks` of reproduction.json from finished runs: `{task: {mode: summary}}`."""
    tasks = {}
    for task, by_mode in runs.items():
        held_out = {json.dumps(_held_out_settings(s["config"]), sort_keys=True) for s in by_mode.values()}
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
        differences: dict[str, dict] = {}
        for party, cells in parties.items():
            pairs = [("fedmkt", baseline) for baseline in BASELINES] + [("standalone", "zero_shot")]
            for a, b in pairs:
                if a in cells and b in cells and cells[a]["correct"] and cells[b]["correct"]:
                    if "same_as" in cells[a]:
                        continue  # a mode that leaves this party untrained: nothing of its own to compare
                    diff, ci = paired_bootstrap(cells[a]["correct"], cells[b]["correct"])
                    differences.setdefault(party, {})[f"{a}-{b}"] = {"diff": diff, "ci": ci}
        zero_shot_cells = {party: cells.get("zero_shot") for party, cells in parties.items()}
        per_round = fedmkt_per_round(by_mode.get("fedmkt"), zero_shot_cells)
        for cells in parties.values():
            for cell in cells.values():
                cell.pop("correct")
                cell.pop("n")
        tasks[task] = {
            "n_eval": sizes.pop() if sizes else 0,
            "parties": parties,
            "differences": differences,
            "fedmkt_per_round": per_round,
            "missing": [mode for mode in MODES if mode not in by_mode],
            "paper_shape": paper_shape(differences, parties_names),
        }
    return tasks


def fedmkt_per_round(summary: Optional[dict], zero_shot_cells: dict[str, Optional[dict]]) -> dict[str, list[dict]]:
    """FedMKT's accuracy after each round, and its paired difference from zero-shot, per party.

    Under `optimizer.schedule: phase` each phase restarts its learning-rate schedule, so round k is
    what a k-round run gives; under `run` (the default) round k is part-way along one decay over all
    rounds, so the rows show the run's course, not what a shorter run would reach."""
    if summary is None:
        return {}
    rows: dict[str, list[dict]] = {}
    for party, zero_shot in zero_shot_cells.items():
        for round_record in summary.get("rounds", []):
            entry = round_record["parties"].get(party)
            if not entry or entry.get("eval_accuracy") is None:
                continue
            row = {"round": round_record["round"], "acc": entry["eval_accuracy"], "ci": list(entry["eval_accuracy_ci"])}
            if zero_shot and zero_shot["correct"] and entry.get("eval_correct"):
                diff, ci = paired_bootstrap(entry["eval_correct"], zero_shot["correct"])
                row["minus_zero_shot"] = {"diff": diff, "ci": ci}
            rows.setdefault(party, []).append(row)
    return rows


CLOSE_TO_CENTRALIZED = 0.03
""""The LLM's FedMKT is close to Centralized": at 95 % it is at most this far below (3 points)."""


def paper_shape(differences: dict[str, dict], parties: list[str]) -> list[dict]:
    """The paper's claims, each with a verdict from the paired intervals: `holds` (the interval is
    clear of the bound), `contradicted` (clear on the wrong side), `not shown` (the bound lies
    inside the interval) or `not measured`."""

    def verdict(item: Optional[dict], bound: float = 0.0) -> str:
        if item is None:
            return "not measured"
        low, high = item["ci"]
        return "holds" if low > bound else "contradicted" if high < bound else "not shown"

    def evidence(party: str, key: str) -> str:
        item = differences.get(party, {}).get(key)
        return f"{party} {key}: {_points(item)}" if item else f"{party} {key}: not measured"

    claims = []
    for party in parties[1:]:
        for key, claim in (
            ("fedmkt-standalone", "FedMKT > Standalone"),
            ("standalone-zero_shot", "Standalone > Zero-Shot"),
        ):
            item = differences.get(party, {}).get(key)
            claims.append({"claim": f"{party}: {claim}", "verdict": verdict(item), "evidence": evidence(party, key)})
    server = differences.get("server", {})
    claims.append(
        {
            "claim": "server: FedMKT > Zero-Shot",
            "verdict": verdict(server.get("fedmkt-zero_shot")),
            "evidence": evidence("server", "fedmkt-zero_shot"),
        }
    )
    claims.append(
        {
            "claim": f"server: FedMKT close to Centralized (at most {100 * CLOSE_TO_CENTRALIZED:.0f} points below)",
            "verdict": verdict(server.get("fedmkt-centralized"), -CLOSE_TO_CENTRALIZED),
            "evidence": evidence("server", "fedmkt-centralized"),
        }
    )
    controls = [verdict(differences.get(party, {}).get("fedmkt-fedmkt_no_kd")) for party in parties]
    measured = [v for v in controls if v != "not measured"]
    overall = (
        "not measured"
        if not measured
        else "holds"
        if "holds" in measured
        else "contradicted"
        if all(v == "contradicted" for v in measured)
        else "not shown"
    )
    claims.append(
        {
            "claim": "FedMKT > FedMKT with lambda = 1 for at least one party (the KD term's own gain)",
            "verdict": overall,
            "evidence": "; ".join(evidence(party, "fedmkt-fedmkt_no_kd") for party in parties),
        }
    )
    return claims


def _party_names(by_mode: dict[str, dict]) -> list[str]:
    summary = next(iter(by_mode.values()))
    return ["server"] + [f"client_{i}" for i in range(len(summary["config"]["clients"]))]


# ---- outputs ------------------------------------------------------------------------------------


def _percent(cell: Optional[dict]) -> str:
    if cell is None:
        return "–"
    low, high = cell["ci"]
    mark = " =ZS" if cell.get("same_as") else ""
    norm = f" ({100 * cell['acc_norm']:.1f})" if cell.get("acc_norm") is not None else ""
    return f"{100 * cell['acc']:.1f} [{100 * low:.1f}, {100 * high:.1f}]{norm}{mark}"


def _points(item: Optional[dict]) -> str:
    if item is None:
        return "–"
    low, high = item["ci"]
    return f"{100 * item['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def table(report: dict, recorded: list[str], tries: list[str]) -> str:
    lines = []
    for task, result in report["tasks"].items():
        lines += [
            f"## {task}: accuracy (%) [95 % Wilson CI] (acc_norm), n = {result['n_eval']} held-out questions",
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
        if result.get("fedmkt_per_round"):
            lines += [
                "",
                "FedMKT after each round (one learning-rate schedule over all rounds): accuracy (%) "
                "[Wilson CI] and minus zero-shot (points) [paired bootstrap CI]:",
                "",
                "| party | round | fedmkt | fedmkt-zero_shot |",
                "|---|---|---|---|",
            ]
            for party, rows in result["fedmkt_per_round"].items():
                for row in rows:
                    lines.append(
                        f"| {party} | {row['round']} | {_percent(row)} | {_points(row.get('minus_zero_shot'))} |"
                    )
        lines += ["", "The paper's shape (verdicts from the paired intervals above):", ""]
        lines += [f"- {c['claim']}: **{c['verdict']}** ({c['evidence']})" for c in result["paper_shape"]]
        if result.get("seeds"):
            lines += ["", *seeds_table(result["seeds"])]
        if result["missing"]:
            lines += ["", f"Not run yet: {', '.join(result['missing'])}."]
        lines.append("")
    lines += tries
    lines += ["## Every recorded run (task-mode-settings hash)", "", *[f"- {name}" for name in recorded], ""]
    return "\n".join(lines)


def seeds_table(seeds: dict) -> list[str]:
    """Markdown lines: each seed's accuracy per party and mode, then the differences pooled over seeds."""
    lines = [f"Seeds ({seeds['count']}; LoRA init and batch order, the split fixed): accuracy (%) per seed:", ""]
    lines += ["| party | mode | " + " | ".join(f"seed {i}" for i in range(seeds["count"])) + " |"]
    lines += ["|---|---|" + "---|" * seeds["count"]]
    for party, by_mode in seeds["parties"].items():
        for mode, accs in by_mode.items():
            lines.append(
                f"| {party} | {mode} | " + " | ".join("–" if a is None else f"{100 * a:.1f}" for a in accs) + " |"
            )
    lines += ["", "Pooled over seeds (points) [95 % paired bootstrap CI over questions]:", ""]
    lines += ["| party | difference | pooled | seeds |", "|---|---|---|---|"]
    for party, items in seeds["pooled_differences"].items():
        for key, item in items.items():
            lines.append(f"| {party} | {key} | {_points(item)} | {item['seeds']} |")
    return lines


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    """FedMKT accuracy per round per party (with CI bars), the other modes' final accuracy at the last round."""
    try:
        import matplotlib
    except ImportError:
        print(f"reproduce: matplotlib is not installed, so {path.name} is not drawn (pip install -e '.[plots]')")
        return

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


TRIES = "tries"
"""Under `<record>/reproduction/`: one folder per named tuning try, with its own report."""


def tries_table(record: Path) -> list[str]:
    """Markdown lines summing up every named try: its overrides and each party's FedMKT against Zero-Shot."""
    reports = sorted((record / "reproduction" / TRIES).glob("*/reproduction.json"))
    if not reports:
        return []
    lines = [
        "## Tuning tries (each with every mode at the same settings; see tries/NAME/table.md)",
        "",
        "| try | task | overrides | party | fedmkt | fedmkt-zero_shot | fedmkt-standalone | missing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in reports:
        report = json.loads(path.read_text())
        overrides = " ".join(report["settings"].get("overrides") or []) or "(none)"
        for task, result in report["tasks"].items():
            for party, cells in result["parties"].items():
                items = result["differences"].get(party, {})
                lines.append(
                    f"| {path.parent.name} | {task} | {overrides} | {party} | {_percent(cells.get('fedmkt'))} | "
                    f"{_points(items.get('fedmkt-zero_shot'))} | {_points(items.get('fedmkt-standalone'))} | "
                    f"{', '.join(result['missing']) or '–'} |"
                )
    return [*lines, ""]


def write_outputs(
    runs: dict[str, dict[str, dict]],
    settings: dict,
    record: Path,
    name: Optional[str] = None,
    seeds: Optional[dict[str, dict]] = None,
) -> dict:
    """reproduction.json, table.md and the PNG: the main report, or with `name` a tuning try's.
    `seeds`: per task, the `seed_report` of a multi-seed grid."""
    report = {
        "settings": settings,
        "wall_seconds": sum(s.get("wall_seconds") or 0.0 for by_mode in runs.values() for s in by_mode.values()),
        "tasks": assemble(runs),
    }
    for task, seed_result in (seeds or {}).items():
        if task in report["tasks"]:
            report["tasks"][task]["seeds"] = seed_result
    report["settings"]["wall_seconds_per_run"] = {
        f"{task}/{mode}": summary.get("wall_seconds")
        for task, by_mode in runs.items()
        for mode, summary in by_mode.items()
    }
    runs_folder = record / "reproduction" / "runs"
    folder = record / "reproduction" / TRIES / name if name else record / "reproduction"
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic writes: a grid and a try running side by side read each other's reports.
    atomic_write_text(
        folder / "reproduction.json" if name else record / "reproduction.json", json.dumps(report, indent=2) + "\n"
    )
    recorded = sorted(p.stem for p in runs_folder.glob("*.json"))
    atomic_write_text(folder / "table.md", table(report, recorded, [] if name else tries_table(record)))
    if runs:
        plot(runs, folder / "accuracy_per_round.png")
    if name and (record / "reproduction.json").is_file():  # keep the main table's list of tries current
        main = json.loads((record / "reproduction.json").read_text())
        atomic_write_text(record / "reproduction" / "table.md", table(main, recorded, tries_table(record)))
    return report


def seed_cells(
    by_mode: dict[str, dict], task: str, seeded: dict[tuple[str, str, int], RunConfig], count: int, record: Path
) -> dict:
    """`seed_report` of one task: seed 0 from its finished runs, seeds 1.. from the record; Zero-Shot
    (no training) and the parties a mode leaves untrained are the same model in every seed."""
    names = _party_names(by_mode) if by_mode else []
    zero_shot = by_mode.get("zero_shot")
    cells: dict[str, dict[str, list[Optional[dict]]]] = {party: {} for party in names}
    for mode in MODES:
        summaries = [by_mode.get(mode)] + [
            recorded_summary(seeded[task, mode, s], task, mode, record) if (task, mode, s) in seeded else None
            for s in range(1, count)
        ]
        if mode == "zero_shot":
            summaries = [zero_shot] * count
        for party in names:
            source = [zero_shot] * count if party in UNTRAINED.get(mode, ()) else summaries
            entries = [final_entry(summary, party) if summary else None for summary in source]
            row = [cell_of(entry) if entry else None for entry in entries]
            if party in UNTRAINED.get(mode, ()):
                row = [None if cell is None else cell | {"same_as": "zero_shot"} for cell in row]
            if any(row):
                cells[party][mode] = row
    pairs = [("fedmkt", baseline) for baseline in BASELINES] + [("standalone", "zero_shot")]
    result = seed_report(cells, pairs)
    result["count"] = count
    return result


def recorded_runs(
    configs: dict[tuple[str, str], RunConfig], tasks: list[str], record: Path
) -> dict[str, dict[str, dict]]:
    """Every finished cell of these configs found in the record, by task and then mode in grid order."""
    runs: dict[str, dict[str, dict]] = {}
    for task in tasks:
        for mode in GRID_ORDER:
            summary = recorded_summary(configs[task, mode], task, mode, record)
            if summary is not None:
                runs.setdefault(task, {})[mode] = summary
    return runs


def _interrupted_line(interrupt: RunInterrupted, cell: str, mirror_dir: Path) -> str:
    """The one line a stopped grid prints: which cell stopped and what the next call continues from."""
    name = signal.Signals(interrupt.signum).name
    if (mirror_dir / MIRROR_RECORD).is_file():
        round_index = json.loads((mirror_dir / MIRROR_RECORD).read_text())["round"]
        return (
            f"reproduce: stopped by {name} in {cell}; its round-{round_index} checkpoint is kept in {mirror_dir}. "
            "Fix: run the same command again to continue from it."
        )
    return (
        f"reproduce: stopped by {name} in {cell} before its first round checkpoint. "
        "Fix: run the same command again to start that cell over."
    )


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
    parser.add_argument(
        "--seeds", type=int, default=1, help="run every trained mode with this many training seeds (the split fixed)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="run folders")
    parser.add_argument("--record", type=Path, default=Path("benchmarks/results"), help="where results are recorded")
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="round-checkpoint mirrors (default: the fedmkt cache's reproduce/)"
    )
    parser.add_argument("--override", nargs="*", default=[], help="KEY=VALUE config overrides for every run")
    parser.add_argument(
        "--try",
        dest="try_name",
        default=None,
        help=f"name of a tuning try: its report goes to <record>/reproduction/{TRIES}/NAME/ (default: the main report)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: use 1 or more")
    if args.try_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.try_name):
        parser.error(f"--try {args.try_name!r}: use letters, digits, '.', '-' and '_' only (it names a folder)")
    modes = [mode for mode in GRID_ORDER if mode in args.modes]
    record = args.record / "reproduction"
    state = args.state_dir or cache_root() / "reproduce"
    settings: dict = {"base_config": args.config, "part_size": args.part_size, "rounds": args.rounds, "tasks": {}}
    settings["overrides"] = args.override
    configs: dict[tuple[str, str], RunConfig] = {}
    seeded: dict[tuple[str, str, int], RunConfig] = {}  # seeds 1.. of each trained mode
    settings["seeds"] = args.seeds
    # Every finished run of these settings is reported, also those a call with other --modes ran,
    # and in the main report those of other --tasks: a call that runs BoolQ keeps ARC-Easy's
    # results. A try reports only the tasks it was run on.
    reported = list(dict.fromkeys(args.tasks if args.try_name else [*EVAL_SIZES, *args.tasks]))
    for task in reported:
        scale = {
            "eval_size": args.eval_size or EVAL_SIZES.get(task, 1000),
            "part_size": args.part_size,
            "rounds": args.rounds,
        }
        for mode in GRID_ORDER:
            configs[task, mode] = grid_config(args.config, task, mode, scale, args.out, args.override)
            for seed_index in range(1, args.seeds if mode != "zero_shot" else 1):
                seeded[task, mode, seed_index] = grid_config(
                    args.config, task, mode, scale, args.out, args.override, seed_index
                )

    def report_now() -> dict:
        # Read from the record each time, not kept in memory: a grid running side by side with
        # this one (other --modes, one torch thread each) records cells this call did not run.
        runs = recorded_runs(configs, reported, record)
        for task in reported:
            if task in args.tasks or task in runs:
                settings["tasks"][task] = {
                    "n_eval": configs[task, GRID_ORDER[0]].data.eval_size,
                    **{f"settings_hash_{m}": settings_hash(configs[task, m]) for m in GRID_ORDER},
                }
        seeds = {task: seed_cells(runs.get(task, {}), task, seeded, args.seeds, record) for task in runs}
        return write_outputs(runs, dict(settings), args.record, args.try_name, seeds if args.seeds > 1 else None)

    cells = [(task, mode, 0) for task in args.tasks for mode in modes]
    cells += [
        (task, mode, s) for s in range(1, args.seeds) for task in args.tasks for mode in modes if mode != "zero_shot"
    ]
    report = report_now()
    for index, (task, mode, seed_index) in enumerate(cells, 1):
        config = seeded[task, mode, seed_index] if seed_index else configs[task, mode]
        label = f"[{index}/{len(cells)}] {task} {mode}" + (f" seed {seed_index}" if seed_index else "")
        try:
            with stop_on_signals():
                run_cell(config, task, mode, record, label, state)
        except RunInterrupted as interrupt:
            mirror_dir = state / "in_progress" / cell_name(config, task, mode)
            print(_interrupted_line(interrupt, f"{task} {mode}", mirror_dir), file=sys.stderr)
            return 128 + interrupt.signum
        report = report_now()  # after every cell
    folder = record / TRIES / args.try_name if args.try_name else record
    print((folder / "table.md").read_text())
    print(f"wall time of the runs: {report['wall_seconds']:.0f} s; report in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
