"""`FederatedTrainer`: FedMKT's round protocol, top to bottom.

One round (the 11 steps of the paper):
  1–3   each client fine-tunes on its private data, then shares top-k logits + losses on the public data;
  4–6   the server aligns, selects (DualMinCE) and distils from the clients;
  7–8   the server shares its own top-k logits + losses;
  9–11  each client aligns, selects and distils from the server.
Every payload crosses the boundary as bytes (counted, then validated on arrival).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from lightning.pytorch.loggers import Logger

from fedmkt.config import RunConfig
from fedmkt.federation.participant import Participant
from fedmkt.payload import KnowledgePayload


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no partial files left behind
        raise


class FederatedTrainer:
    """Runs the protocol over in-process participants and records what each party did."""

    def __init__(
        self,
        server: Participant,
        clients: list[Participant],
        config: RunConfig,
        run_dir: Path,
        loggers: Optional[list[Logger]] = None,
    ) -> None:
        self.server = server
        self.clients = clients
        self.config = config
        self.run_dir = Path(run_dir)
        self.loggers = loggers or []
        self.summary: dict = {"config": asdict(config), "zero_shot": {}, "rounds": []}
        self._traffic: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_sent": 0, "bytes_received": 0})

    @property
    def parties(self) -> list[Participant]:
        return [self.server, *self.clients]

    # ---- the protocol ---------------------------------------------------------------------

    def fit(self) -> dict:
        """All rounds; returns the summary (also in `<run_dir>/summary.json`)."""
        if self.config.federation.evaluate_before:
            self.summary["zero_shot"] = {p.name: p.evaluate() for p in self.parties}
            self._log({p: {"eval_accuracy": s["eval_accuracy"]} for p, s in self.summary["zero_shot"].items()}, step=0)
            self._write_summary()
        for round_index in range(1, self.config.federation.rounds + 1):
            self.run_round(round_index)
        return self.summary

    def run_round(self, round_index: int) -> dict:
        """One FedMKT round; appends its record to the summary and saves adapters."""
        self._traffic.clear()
        stats: dict[str, dict] = {}

        client_knowledge = {}
        for client in self.clients:
            stats[client.name] = client.fine_tune(round_index)
            client_knowledge[client.name] = self._send(client.share_knowledge(round_index), receivers=[self.server])

        stats[self.server.name] = self.server.distill(round_index, client_knowledge)

        server_knowledge = self._send(self.server.share_knowledge(round_index), receivers=self.clients)

        for client in self.clients:
            distilled = client.distill(round_index, {self.server.name: server_knowledge})
            stats[client.name] = self._merge_phases(stats[client.name], distilled)

        if self.config.federation.evaluate_every_round:
            for party in self.parties:
                stats[party.name] |= party.evaluate()
        for party in self.parties:
            stats[party.name] |= self._traffic[party.name]
            party.save_adapter(self.run_dir / "adapters" / f"round_{round_index}" / party.name)

        record = {"round": round_index, "parties": stats}
        self.summary["rounds"].append(record)
        self._write_summary()
        self._log(stats, step=round_index)
        return record

    # ---- helpers --------------------------------------------------------------------------

    def _send(self, payload: KnowledgePayload, receivers: list[Participant]) -> KnowledgePayload:
        """Serialise once, count bytes on both ends, and hand receivers a validated copy."""
        data = payload.to_bytes()
        self._traffic[payload.sender]["bytes_sent"] += len(data) * len(receivers)
        for receiver in receivers:
            self._traffic[receiver.name]["bytes_received"] += len(data)
        received = KnowledgePayload.from_bytes(data)
        received.validate(num_public=len(receivers[0].data.public))
        return received

    @staticmethod
    def _merge_phases(local: dict, distill: dict) -> dict:
        """A client's round entry: task loss of local fine-tuning, KD/selection of distillation."""
        return {
            "task_loss": local["task_loss"],
            "distill_task_loss": distill["task_loss"],
            "kd_loss": distill["kd_loss"],
            "selected": distill["selected"],
            "teacher_counts": distill["teacher_counts"],
            "train_seconds": local["train_seconds"] + distill["train_seconds"],
        }

    def _write_summary(self) -> None:
        # Standard JSON for the tools that read it: a NaN/inf (e.g. the task loss of a phase that did
        # not train) is written as null.
        text = json.dumps(_finite_or_none(self.summary), indent=2, default=_json_default, allow_nan=False)
        atomic_write_text(self.run_dir / "summary.json", text)

    def _log(self, stats: dict[str, dict], step: int) -> None:
        metrics = {}
        for party, values in stats.items():
            for key, value in values.items():
                if isinstance(value, dict):  # e.g. teacher_counts -> server/teacher_counts/client_0
                    metrics |= {f"{party}/{key}/{name}": float(v) for name, v in value.items()}
                elif isinstance(value, (int, float)) and not math.isnan(value):
                    metrics[f"{party}/{key}"] = float(value)
        metrics["round"] = step
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def results_table(self) -> str:
        """Accuracy per party per round (round 0 = zero-shot) as a markdown table."""
        rounds = self.summary["rounds"]
        header = ["party"] + (["zero-shot"] if self.summary["zero_shot"] else []) + [f"round {r['round']}" for r in rounds]
        header += ["selected (last)", "MB sent (last)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for party in self.parties:
            cells = [party.name]
            if self.summary["zero_shot"]:
                cells.append(f"{self.summary['zero_shot'][party.name]['eval_accuracy']:.3f}")
            for record in rounds:
                accuracy = record["parties"][party.name].get("eval_accuracy")
                cells.append("–" if accuracy is None else f"{accuracy:.3f}")
            last = rounds[-1]["parties"][party.name] if rounds else {}
            cells += [str(last.get("selected", "–")), f"{last.get('bytes_sent', 0) / 1e6:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _finite_or_none(value):
    """A copy of a JSON-like tree with non-finite floats replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
