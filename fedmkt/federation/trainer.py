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
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch.loggers import Logger
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    read_checkpoint,
    restore_rng_state,
)
from fedmkt.federation.distributed import is_rank_zero
from fedmkt.federation.participant import Participant
from fedmkt.federation.stages import StageRunner, run_one_by_one
from fedmkt.payload import KnowledgePayload

# Which steps of a round each mode runs (baselines are the method with steps removed or added).
_MODE_STEPS = {
    "fedmkt": {"client_train", "client_share", "server_distil", "server_share", "client_distil"},
    "fedavg": {"client_train", "client_share", "server_distil", "server_share", "client_distil", "adapter_average"},
    "llm2slm": {"client_train", "server_share", "client_distil"},
    "standalone": {"client_train"},
    "centralized": {"server_train"},
    "zero_shot": set(),
}

_EMPTY_ENTRY = {"task_loss": float("nan"), "kd_loss": 0.0, "selected": 0, "teacher_counts": {}, "train_seconds": 0.0}


class FederatedTrainer:
    """Runs the protocol over in-process participants and records what each party did."""

    def __init__(
        self,
        server: Participant,
        clients: list[Participant],
        config: RunConfig,
        run_dir: Path,
        loggers: Optional[list[Logger]] = None,
        run_clients: StageRunner = run_one_by_one,
    ) -> None:
        self.server = server
        self.clients = clients
        self.config = config
        self.run_dir = Path(run_dir)
        self.loggers = loggers or []
        self.steps = _MODE_STEPS[config.federation.mode]
        self.num_public = len(server.data.public)  # every party holds the same public samples
        self.summary: dict = {"config": asdict(config), "zero_shot": {}, "rounds": []}
        self._traffic: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_sent": 0, "bytes_received": 0})
        self.run_clients = run_clients
        """How a client stage runs (one by one in-process; all clients at once on Flower)."""
        self._timeline: dict[str, list[dict]] = defaultdict(list)

    @property
    def parties(self) -> list[Participant]:
        return [self.server, *self.clients]

    # ---- the protocol ---------------------------------------------------------------------

    def fit(self, start_round: int = 1) -> dict:
        """All rounds from `start_round`; returns the summary (also in `<run_dir>/summary.json`)."""
        if start_round == 1 and self.config.federation.evaluate_before:
            clients = self._client_stage("evaluate", self.clients, (), {}, tolerate=False)
            self.summary["zero_shot"] = {self.server.name: self.server.evaluate()} | clients
            self._log(self.summary["zero_shot"], step=0)
            self._write_summary()
        if not self.steps:  # zero_shot: nothing to train
            return self.summary
        for round_index in range(start_round, self.config.federation.rounds + 1):
            self.run_round(round_index)
        return self.summary

    def run_round(self, round_index: int) -> dict:
        """One round; appends its record to the summary, saves adapters and a checkpoint."""
        started = time.perf_counter()
        self._traffic.clear()
        self._timeline.clear()
        stats: dict[str, dict] = {party.name: dict(_EMPTY_ENTRY) for party in self.parties}
        failed: dict[str, str] = {}

        # Steps 1–3: clients fine-tune on private data and share knowledge of the public data.
        client_knowledge = {}
        if "client_train" in self.steps:
            for name, result in self._client_stage("fine_tune", self.clients, (round_index,), failed).items():
                stats[name] |= result
            if "client_share" in self.steps:
                answering = [c for c in self.clients if c.name not in failed]
                for name, payload in self._client_stage("share_knowledge", answering, (round_index,), failed).items():
                    try:
                        client_knowledge[name] = self._send(payload, receivers=[self.server])
                    except Exception as error:  # a client whose payload is refused is left out
                        failed[name] = _describe(error)
        self._require_quorum(round_index, failed)

        # Steps 4–6: the server distils from the clients (or, centralized, trains on all data).
        if "server_distil" in self.steps:
            stats[self.server.name] |= self._timed(self.server, "distill", round_index, client_knowledge)
        if "server_train" in self.steps:
            stats[self.server.name] |= self._timed(self.server, "fine_tune", round_index)

        # Steps 7–11: the server shares its knowledge; each client distils from it.
        if "server_share" in self.steps:
            answering = [c for c in self.clients if c.name not in failed]
            shared = self._timed(self.server, "share_knowledge", round_index)
            server_knowledge = self._send(shared, receivers=answering)
            teachers = {self.server.name: server_knowledge}
            for name, distilled in self._client_stage("distill", answering, (round_index, teachers), failed).items():
                stats[name] = self._merge_phases(stats[name], distilled)
            self._require_quorum(round_index, failed)

        if "adapter_average" in self.steps:
            self._average_client_adapters([c for c in self.clients if c.name not in failed])

        federation = self.config.federation
        last_round = round_index == federation.rounds
        if federation.evaluate_every_round or (federation.evaluate_final and last_round):
            learning = self._parties_that_learn()
            if self.server in learning:
                stats[self.server.name] |= self._timed(self.server, "evaluate")
            clients = [c for c in learning if c is not self.server]
            for name, scores in self._client_stage("evaluate", clients, (), failed, tolerate=False).items():
                stats[name] |= scores
        for party in self.parties:
            stats[party.name] |= self._traffic[party.name]
            stats[party.name]["timeline"] = self._timeline[party.name]  # save_adapter is added when it runs
            if party.name in failed:
                stats[party.name]["failed"] = failed[party.name]

        record = {
            "round": round_index,
            "parties": stats,
            "failed": failed,
            "wall_seconds": time.perf_counter() - started,  # the round's wall time, its checkpoint aside
        }
        self.summary["rounds"].append(record)
        self._save_checkpoint(round_index, failed)
        self._log(stats, step=round_index)
        for name, reason in failed.items():
            warnings.warn(f"round {round_index}: {name} failed and was left out ({reason})", stacklevel=1)
        return record

    def _timed(self, party: Participant, phase: str, *args):
        """`party.<phase>(*args)`, its span added to the party's round timeline."""
        start = time.time()
        try:
            return getattr(party, phase)(*args)
        finally:
            self._timeline[party.name].append({"phase": phase, "start": start, "end": time.time()})

    def _client_stage(
        self,
        phase: str,
        clients: list[Participant],
        args: Union[tuple, Callable[[Participant], tuple]],
        failed: dict[str, str],
        tolerate: bool = True,
    ) -> dict[str, object]:
        """One phase on every client in `clients` through `run_clients`; returns the answering clients' results.

        `args` are the phase's arguments, or a function giving each client its own. A client whose
        call raised goes into `failed`; with `tolerate` off its error stops the run, as a server's
        would, unless the client had already failed this round (a dead node cannot evaluate either).
        """
        if not clients:
            return {}
        outcomes = self.run_clients(phase, [(client, args(client) if callable(args) else args) for client in clients])
        results = {}
        for client in clients:
            outcome = outcomes[client.name]
            self._timeline[client.name].append(outcome.span(phase))
            if outcome.error is None:
                results[client.name] = outcome.value
            elif client.name in failed:
                continue  # left out already; its first reason stands
            elif not tolerate:
                raise outcome.error
            else:
                failed[client.name] = _describe(outcome.error)
        return results

    def _parties_that_learn(self) -> list[Participant]:
        """Parties whose weights this mode changes (others keep their zero-shot accuracy)."""
        server_learns = bool(self.steps & {"server_distil", "server_train"})
        clients_learn = bool(self.steps & {"client_train", "client_distil"})
        return ([self.server] if server_learns else []) + (self.clients if clients_learn else [])

    def _require_quorum(self, round_index: int, failed: dict[str, str]) -> None:
        answered = len(self.clients) - len(failed)
        same = {reason.replace(name, "<client>") for name, reason in failed.items()}
        if round_index == 1 and self.clients and len(failed) == len(self.clients) and len(same) == 1:
            # Every client failing alike before any checkpoint exists is a config value, not a client fault.
            raise FedMKTError(
                f"round 1: every client failed the same way ({next(iter(failed.values()))}); this is a configuration "
                "error, not a client fault, and no round checkpoint was written. Fix: correct the config value it "
                "names, then start the run again (add --overwrite to reuse this run_dir)."
            )
        if failed and answered < self.config.federation.min_clients:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            if self.config.federation.backend == "flower":  # the clients are SuperNodes on other machines
                fix = (
                    "repair those clients (see their SuperNodes' logs; keep each node's output-dir), then "
                    f"`fedmkt fit --config {self.run_dir / 'config.yaml'} --backend flower --resume {self.run_dir}` "
                    "(or `fedmkt launch-local ... --resume`): the last round checkpoint is intact"
                )
            else:
                fix = f"repair those clients, then `fedmkt fit --config ... --resume {self.run_dir}` (the last round checkpoint is intact)"
            raise FedMKTError(
                f"round {round_index}: only {answered} of {len(self.clients)} clients answered "
                f"(federation.min_clients={self.config.federation.min_clients}) — {reasons}. Fix: {fix}."
            )

    def _average_client_adapters(self, clients: list[Participant]) -> None:
        """FedAvg baseline: every client adopts the mean of the clients' LoRA weights."""
        states = [client.adapter_state() for client in clients]
        keys = set(states[0])
        if any(set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys) for s in states):
            raise FedMKTError(
                "federation.mode fedavg needs clients with identical architectures and LoRA settings. Fix: use mode fedmkt for heterogeneous clients."
            )
        mean = {key: torch.stack([s[key].float() for s in states]).mean(0).to(states[0][key].dtype) for key in keys}
        size = len(save_safetensors({k: v.contiguous() for k, v in mean.items()}))
        for client in clients:
            client.load_adapter_state(mean)
            self._traffic[client.name]["bytes_sent"] += size  # its adapter up ...
            self._traffic[client.name]["bytes_received"] += size  # ... the average down
            self._traffic[self.server.name]["bytes_received"] += size
            self._traffic[self.server.name]["bytes_sent"] += size

    # ---- checkpoints ----------------------------------------------------------------------

    def _save_checkpoint(self, round_index: int, failed: Optional[dict[str, str]] = None) -> None:
        """Adapters of every party, then the summary, then the checkpoint record — each atomic.

        `checkpoint.json` is written last, so it only ever names a round whose files are complete.
        """
        folder = self.run_dir / "adapters" / f"round_{round_index}"
        # Every rank, in one order: a sharded (fsdp) party gathers its adapter first.
        self._timed(self.server, "save_adapter", folder / self.server.name)
        saved = self._client_stage("save_adapter", self.clients, lambda c: (folder / c.name,), failed or {}, False)
        if not is_rank_zero():  # one writer; other ranks hold the same state
            return
        for party in self.parties:
            losses = party.cached_public_losses()
            if losses is not None:
                atomic_write_bytes(
                    self.run_dir / "checkpoint" / f"public_losses_{party.name}.safetensors",
                    save_safetensors({"losses": losses.contiguous()}),
                )
        self._write_summary()
        state = {"round": round_index, "summary": _finite_or_none(self.summary), "rng": capture_rng_state()}
        hashes = {name: digest for name, digest in saved.items() if digest}  # adapters saved on other machines
        if hashes:
            state["adapter_sha256"] = hashes
        atomic_write_text(
            self.run_dir / "checkpoint" / "checkpoint.json", json.dumps(state, default=_json_default, allow_nan=False)
        )

    def restore(self, state: Optional[dict] = None) -> int:
        """Load the last complete round checkpoint from `run_dir`; returns the round to start at.

        `state` is the record `read_checkpoint` already read (and `check_resumable` accepted).
        """
        state = read_checkpoint(self.run_dir) if state is None else state
        check_resumable(state, self.config, self.run_dir)
        round_index = int(state["round"])
        for party in self.parties:
            directory = self.run_dir / "adapters" / f"round_{round_index}" / party.name
            try:
                party.load_adapter(directory)
            except FedMKTError:
                raise
            except Exception as error:  # a truncated safetensors file, tensors of another shape, ...
                raise FedMKTError(
                    f"{party.name}: the round {round_index} adapter in {directory} cannot be loaded ({_describe(error)}). "
                    "Fix: the checkpoint is damaged; start afresh with --overwrite (or another run_dir)."
                ) from error
            losses_file = self.run_dir / "checkpoint" / f"public_losses_{party.name}.safetensors"
            party.restore_public_losses(load_safetensors_file(losses_file)["losses"] if losses_file.is_file() else None)
        self.summary = state["summary"]
        self.summary["config"] = asdict(self.config)
        restore_rng_state(state["rng"])
        return round_index + 1

    # ---- helpers --------------------------------------------------------------------------

    def _send(self, payload: KnowledgePayload, receivers: list[Participant]) -> KnowledgePayload:
        """Serialise once, count bytes on both ends, and hand receivers a validated copy."""
        data = payload.to_bytes()
        self._traffic[payload.sender]["bytes_sent"] += len(data) * len(receivers)
        for receiver in receivers:
            self._traffic[receiver.name]["bytes_received"] += len(data)
        return KnowledgePayload.from_bytes(data, num_public=self.num_public)

    @staticmethod
    def _merge_phases(local: dict, distill: dict) -> dict:
        """A client's round entry: task loss of local fine-tuning, KD/selection of distillation."""
        merged = {
            "task_loss": local["task_loss"],
            "distill_task_loss": distill["task_loss"],
            "kd_loss": distill["kd_loss"],
            "selected": distill["selected"],
            "teacher_counts": distill["teacher_counts"],
            "train_seconds": local["train_seconds"] + distill["train_seconds"],
            "ranks": distill.get("ranks", local.get("ranks", 1)),
        }
        if distill.get("sharded") or local.get("sharded"):
            merged["sharded"] = True
        return merged

    def _write_summary(self) -> None:
        # Standard JSON for the tools that read it: a NaN/inf (e.g. the task loss of a phase that did
        # not train) is written as null.
        if not is_rank_zero():
            return
        text = json.dumps(_finite_or_none(self.summary), indent=2, default=_json_default, allow_nan=False)
        atomic_write_text(self.run_dir / "summary.json", text)

    def _log(self, stats: dict[str, dict], step: int) -> None:
        metrics = {}
        for party, values in stats.items():
            for key, value in values.items():
                if isinstance(value, dict):  # e.g. teacher_counts -> server/teacher_counts/client_0
                    metrics |= {f"{party}/{key}/{name}": float(v) for name, v in value.items()}
                elif key.endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
                    metrics |= {f"{party}/{key}_low": float(value[0]), f"{party}/{key}_high": float(value[1])}
                elif isinstance(value, (int, float)) and not math.isnan(value):
                    metrics[f"{party}/{key}"] = float(value)
        metrics["round"] = step
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    def results_table(self) -> str:
        """Score per party per round (round 0 = zero-shot) as a markdown table.

        Multiple choice: accuracy with its 95 % Wilson interval; generation: Rouge-L (exact match).
        The header names the held-out set's size.
        """
        rounds = self.summary["rounds"]
        header = (
            ["party"] + (["zero-shot"] if self.summary["zero_shot"] else []) + [f"round {r['round']}" for r in rounds]
        )
        header += ["selected (last)", "MB sent (last)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        sizes, generation = set(), False
        for party in self.parties:
            cells = [party.name]
            scored = ([self.summary["zero_shot"][party.name]] if self.summary["zero_shot"] else []) + [
                record["parties"][party.name] for record in rounds
            ]
            for entry in scored:
                cells.append(_score_cell(entry))
                if entry.get("eval_n") is not None:
                    sizes.add(entry["eval_n"])
                generation |= entry.get("eval_rouge_l") is not None
            last = rounds[-1]["parties"][party.name] if rounds else {}
            cells += [str(last.get("selected", "–")), f"{last.get('bytes_sent', 0) / 1e6:.2f}"]
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


def check_resumable(state: dict, config: RunConfig, run_dir: Path) -> None:
    """Refuse a checkpoint saved under another config: the continued run would silently differ."""
    saved = state["summary"]["config"]
    current = _finite_or_none(json.loads(json.dumps(asdict(config), default=_json_default)))
    differing = _differing_keys(
        saved, current, ignore={"run_dir", "federation.rounds", "logging", "federation.backend", "flower"}
    )
    if differing:
        raise FedMKTError(
            f"--resume config differs from the checkpoint's at {', '.join(differing)}. Fix: resume with {Path(run_dir) / 'config.yaml'}."
        )


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


def _describe(error: BaseException) -> str:
    """`TypeName: message` on one line, for summary.json."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]


def _differing_keys(saved: dict, current: dict, ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, ignore, dotted + ".")
        elif a != b:
            keys.append(dotted)
    return keys
