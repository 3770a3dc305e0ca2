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

    Multiple choice: accuracy with its 95 % Wilson interval; generation: Rouge-L (exact match).
    A line under the table names the held-out set's size.
    """
    rounds = summary["rounds"]
    zero_shot = summary["zero_shot"]
    header = ["party"] + (["zero-shot"] if zero_shot else []) + [f"round {r['round']}" for r in rounds]
    header += ["selected (last)", "MB sent (last)"]
    private = bool(rounds) and any(e.get("dp_epsilon") is not None for e in rounds[-1]["parties"].values())
    if private:
        header.append("DP ε (last)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sizes, generation = set(), False
    for party in parties:
        cells = [party]
        scored = ([zero_shot[party]] if zero_shot else []) + [record["parties"][party] for record in rounds]
        for entry in scored:
            cells.append(_score_cell(entry))
            if entry.get("eval_n") is not None:
                sizes.add(entry["eval_n"])
            generation |= entry.get("eval_rouge_l") is not None
        last = rounds[-1]["parties"][party] if rounds else {}
        cells += [str(last.get("selected", "–")), f"{last.get('bytes_sent', 0) / 1e6:.2f}"]
        if private:
            cells.append(
                "–" if last.get("dp_epsilon") is None else f"{last['dp_epsilon']:.2f} (δ = {last['dp_delta']:g})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    if sizes:
        metric = "Rouge-L (exact match)" if generation else "accuracy [95 % Wilson CI]"
        lines.append(f"\n{metric} on n = {', '.join(str(n) for n in sorted(sizes))} held-out examples")
    return "\n".join(lines)


def _score_cell(entry: dict) -> str:
    """`0.533 [0.41, 0.65]` for an accuracy, `0.212 (0.10)` for Rouge-L and exact match, – if unscored."""
    if entry.get("eval_accuracy") is not None:
        cell = f"{entry['eval_accuracy']:.3f}"
        interval = entry.get("eval_accuracy_ci")
        return cell + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
    if entry.get("eval_rouge_l") is not None:
        return f"{entry['eval_rouge_l']:.3f} ({entry['eval_exact_match']:.2f})"
    return "–"
