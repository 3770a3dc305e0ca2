"""What a run records: summary.json, the metrics its loggers get, and the results table it prints.

summary.json is standard JSON (a NaN or inf, e.g. the task loss of a phase that did not train,
is written as null). Other tools and tests read its keys: per party and round, those of
`PhaseStats.to_dict`, then the evaluation scores, the bytes sent and received, and `failed`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.loggers import Logger

from fedmkt.federation.distributed import is_rank_zero
from fedmkt.files import atomic_write_text, standard_json


def write_summary(run_dir: Path, summary: dict) -> None:
    """`<run_dir>/summary.json`, written atomically by rank 0 alone."""
    if is_rank_zero():
        atomic_write_text(Path(run_dir) / "summary.json", standard_json(summary, indent=2))


def flat_metrics(stats: dict[str, dict], step: int) -> dict[str, float]:
    """One round's entries as `party/key` numbers for loggers.

    A dict value becomes one metric per item (`server/teacher_counts/client_0`), an interval its two
    ends (`eval_accuracy_ci_low`, `_high`); NaN and non-numeric values are left out.
    """
    metrics: dict[str, float] = {}
    for party, values in stats.items():
        for key, value in values.items():
            if isinstance(value, dict):
                metrics |= {f"{party}/{key}/{name}": float(v) for name, v in value.items()}
            elif key.endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
                metrics |= {f"{party}/{key}_low": float(value[0]), f"{party}/{key}_high": float(value[1])}
            elif isinstance(value, (int, float)) and not math.isnan(value):
                metrics[f"{party}/{key}"] = float(value)
    metrics["round"] = step
    return metrics


def log_metrics(loggers: Iterable[Logger], stats: dict[str, dict], step: int) -> None:
    """Hand one round's metrics (see `flat_metrics`) to every logger and flush it."""
    metrics = flat_metrics(stats, step)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def results_table(summary: dict, parties: list[str]) -> str:
    """Score per party per round (round 0 = zero-shot) as a markdown table.

    Multiple choice: accuracy with its 95 % Wilson interval and acc_norm; generation: Rouge-L (exact
    match). With named held-out sets (e.g. one per domain) each party gets a row per set and one for
    all of them pooled. A line under the table names the held-out sets' sizes.
    """
    rounds = summary["rounds"]
    zero_shot = summary["zero_shot"]
    scored_entries = {
        party: ([zero_shot[party]] if zero_shot else []) + [record["parties"][party] for record in rounds]
        for party in parties
    }
    sets = named_sets(entry for entries in scored_entries.values() for entry in entries)
    header = ["party"] + (["held-out set"] if sets else [])
    header += (["zero-shot"] if zero_shot else []) + [f"round {r['round']}" for r in rounds]
    header += ["selected (last)", "MB sent (last)"]
    private = bool(rounds) and any(e.get("dp_epsilon") is not None for e in rounds[-1]["parties"].values())
    if private:
        header.append("DP ε (last)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sizes: dict[str, set] = {}
    generation = False
    for party in parties:
        last = rounds[-1]["parties"][party] if rounds else {}
        tail = [str(last.get("selected", "–")), f"{last.get('bytes_sent', 0) / 1e6:.2f}"]
        if private:
            tail.append(
                "–" if last.get("dp_epsilon") is None else f"{last['dp_epsilon']:.2f} (δ = {last['dp_delta']:g})"
            )
        for name in [*sets, None] if sets else [None]:
            prefix = "eval" if name is None else f"eval_{name}"
            cells = [party] + ([name or "pooled"] if sets else [])
            for entry in scored_entries[party]:
                cells.append(_score_cell(entry, prefix))
                if entry.get(f"{prefix}_n") is not None:
                    sizes.setdefault(name or "pooled", set()).add(entry[f"{prefix}_n"])
                generation |= entry.get(f"{prefix}_rouge_l") is not None
            lines.append("| " + " | ".join(cells + tail) + " |")
    if sizes:
        metric = "Rouge-L (exact match)" if generation else "accuracy [95 % Wilson CI] (acc_norm)"
        if sets:
            counts = "; ".join(f"{name} {', '.join(str(n) for n in sorted(ns))}" for name, ns in sizes.items())
            lines.append(f"\n{metric} on held-out examples: {counts}")
        else:
            lines.append(f"\n{metric} on n = {', '.join(str(n) for n in sorted(sizes['pooled']))} held-out examples")
    return "\n".join(lines)


def named_sets(entries: Iterable[dict]) -> list[str]:
    """The named held-out sets scored in these entries (`eval_<name>_n`), in the order first seen."""
    names: dict[str, None] = {}
    for entry in entries:
        for key in entry or {}:
            if key.startswith("eval_") and key.endswith("_n") and key != "eval_n":
                names[key[len("eval_") : -len("_n")]] = None
    return list(names)


def _score_cell(entry: dict, prefix: str = "eval") -> str:
    """`0.533 [0.41, 0.65] (0.550)`: accuracy, Wilson interval, acc_norm; `0.212 (0.10)` for Rouge-L
    and exact match; – if unscored."""
    if entry.get(f"{prefix}_accuracy") is not None:
        cell = f"{entry[f'{prefix}_accuracy']:.3f}"
        interval = entry.get(f"{prefix}_accuracy_ci")
        cell += f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        norm = entry.get(f"{prefix}_accuracy_norm")
        return cell + (f" ({norm:.3f})" if norm is not None else "")
    if entry.get(f"{prefix}_rouge_l") is not None:
        return f"{entry[f'{prefix}_rouge_l']:.3f} ({entry[f'{prefix}_exact_match']:.2f})"
    return "–"
