"""`FederatedTrainer`: FedMKT's round protocol, top to bottom.

One round (the 11 steps of the paper):
  1–3   each client fine-tunes on its private data, then shares top-k logits + losses on the public data;
  4–6   the server selects (DualMinCE), aligns and distills from the clients;
  7–8   the server shares its own top-k logits + losses;
  9–11  each client selects, aligns and distills from the server.
Every payload crosses the boundary as bytes (counted, then validated on arrival). What a round
leaves behind is written by `checkpoint.py` (adapters, checkpoint) and `summary.py` (summary.json,
metrics, the results table).
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch.loggers import Logger
from safetensors.torch import save as save_safetensors

from fedmkt.config import FederationConfig, RunConfig
from fedmkt.errors import FedMKTError, describe
from fedmkt.federation.checkpoint import adapter_dir, read_checkpoint, restore_checkpoint, save_checkpoint
from fedmkt.federation.client_stages import StageRunner, run_one_by_one
from fedmkt.federation.distributed import is_rank_zero
from fedmkt.federation.protocol import FederatedParty, PhaseStats
from fedmkt.federation.summary import log_metrics, results_table, write_summary
from fedmkt.payload import KnowledgePayload
from fedmkt.received import payload_byte_limit

# Which steps of a round each mode runs (baselines are the method with steps removed or added).
_MODE_STEPS = {
    "fedmkt": {"client_train", "client_share", "server_distill", "server_share", "client_distill"},
    "fedavg": {"client_train", "client_share", "server_distill", "server_share", "client_distill", "adapter_average"},
    "llm2slm": {"client_train", "server_share", "client_distill"},
    "standalone": {"client_train"},
    "centralized": {"server_train"},
    "zero_shot": set(),
}


def trained_phases(mode: str, party: str) -> tuple[str, ...]:
    """The training phases `party` runs each round in `mode`, in the order it runs them."""
    steps = _MODE_STEPS[mode]
    if party == "server":
        return tuple(
            phase for phase, step in (("fine_tune", "server_train"), ("distill", "server_distill")) if step in steps
        )
    return tuple(
        phase for phase, step in (("fine_tune", "client_train"), ("distill", "client_distill")) if step in steps
    )


@dataclass(frozen=True)
class RoundPlan:
    """The protocol of one mode, stated once: the steps a round runs, and when parties are evaluated.

    `FederatedTrainer` runs it; the Flower backend reads `client_follow_ups` to send a client's
    consecutive phases in one message.
    """

    steps: frozenset[str]
    federation: FederationConfig

    @classmethod
    def of(cls, config: RunConfig) -> RoundPlan:
        return cls(frozenset(_MODE_STEPS[config.federation.mode]), config.federation)

    def evaluates(self, round_index: int) -> bool:
        """Whether the parties are evaluated after round `round_index`."""
        federation = self.federation
        return federation.evaluate_every_round or (federation.evaluate_final and round_index == federation.rounds)

    def client_follow_ups(self, phase: str, round_index: int) -> tuple[str, ...]:
        """The phases a client runs right after `phase` in round `round_index`, with nothing of the
        server's in between: its share after its fine-tuning, its evaluation and adapter save after
        its distillation (unless FedAvg averages the adapters first)."""
        if phase == "fine_tune" and "client_share" in self.steps:
            return ("share_knowledge",)
        if phase == "distill" and "adapter_average" not in self.steps:
            return ("evaluate", "save_adapter") if self.evaluates(round_index) else ("save_adapter",)
        return ()


class FederatedTrainer:
    """Runs the protocol over its parties (any `FederatedParty`) and records what each did."""

    def __init__(
        self,
        server: FederatedParty,
        clients: list[FederatedParty],
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
        self.plan = RoundPlan.of(config)
        self.steps = self.plan.steps
        self.num_public = server.num_public  # every party holds the same public samples
        self.summary: dict = {"config": asdict(config), "zero_shot": {}, "rounds": []}
        self._traffic: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes_sent": 0, "bytes_received": 0})
        self.run_clients = run_clients
        """How a client stage runs (one by one in-process; all clients at once on Flower)."""
        self._timeline: dict[str, list[dict]] = defaultdict(list)

    @property
    def parties(self) -> list[FederatedParty]:
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
        trained: dict[str, PhaseStats] = {party.name: PhaseStats() for party in self.parties}
        failed: dict[str, str] = {}

        # Steps 1–3: clients fine-tune on private data and share knowledge of the public data.
        client_knowledge = {}
        if "client_train" in self.steps:
            trained |= self._client_stage("fine_tune", self.clients, (round_index,), failed)
            if "client_share" in self.steps:
                answering = [c for c in self.clients if c.name not in failed]
                for name, payload in self._client_stage("share_knowledge", answering, (round_index,), failed).items():
                    try:
                        client_knowledge[name] = self._send(payload, receivers=[self.server])
                    except Exception as error:  # a client whose payload is refused is left out
                        failed[name] = describe(error)
        self._require_quorum(round_index, failed)

        # Steps 4–6: the server distills from the clients (or, centralized, trains on all data).
        if "server_distill" in self.steps:
            trained[self.server.name] = self._timed(self.server, "distill", round_index, client_knowledge)
        if "server_train" in self.steps:
            trained[self.server.name] = self._timed(self.server, "fine_tune", round_index)

        # Steps 7–11: the server shares its knowledge; each client distills from it.
        if "server_share" in self.steps:
            answering = [c for c in self.clients if c.name not in failed]
            shared = self._timed(self.server, "share_knowledge", round_index)
            server_knowledge = self._send(shared, receivers=answering)
            teachers = {self.server.name: server_knowledge}
            for name, distilled in self._client_stage("distill", answering, (round_index, teachers), failed).items():
                trained[name] = trained[name].then(distilled)
            self._require_quorum(round_index, failed)

        if "adapter_average" in self.steps:
            self._average_client_adapters([c for c in self.clients if c.name not in failed])

        stats = {name: phases.to_dict() for name, phases in trained.items()}
        if self.plan.evaluates(round_index):
            learning = self._parties_that_learn()
            if self.server in learning:
                stats[self.server.name] |= self._timed(self.server, "evaluate")
            clients = [c for c in learning if c is not self.server]
            # A client that cannot evaluate is reported like one that cannot train; its work of the
            # round stands, and the round goes on while the quorum holds.
            for name, scores in self._client_stage("evaluate", clients, (), failed).items():
                stats[name] |= scores
            self._require_quorum(round_index, failed)
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

    def _timed(self, party: FederatedParty, phase: str, *args):
        """`party.<phase>(*args)`, its span added to the party's round timeline."""
        start = time.time()
        try:
            return getattr(party, phase)(*args)
        finally:
            self._timeline[party.name].append({"phase": phase, "start": start, "end": time.time()})

    def _client_stage(
        self,
        phase: str,
        clients: list[FederatedParty],
        args: Union[tuple, Callable[[FederatedParty], tuple]],
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
                failed[client.name] = describe(outcome.error)
        return results

    def _parties_that_learn(self) -> list[FederatedParty]:
        """Parties whose weights this mode changes (others keep their zero-shot accuracy)."""
        server_learns = bool(self.steps & {"server_distill", "server_train"})
        clients_learn = bool(self.steps & {"client_train", "client_distill"})
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

    def _average_client_adapters(self, clients: list[FederatedParty]) -> None:
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
        """Every party's adapter (the clients' through their stage runner), then the checkpoint record."""
        # Every rank, in one order: a sharded (fsdp) party gathers its adapter first.
        self._timed(self.server, "save_adapter", adapter_dir(self.run_dir, round_index, self.server.name))
        saved = self._client_stage(
            "save_adapter",
            self.clients,
            lambda c: (adapter_dir(self.run_dir, round_index, c.name),),
            failed or {},
            False,
        )
        if not is_rank_zero():  # one writer; other ranks hold the same state
            return
        hashes = {name: digest for name, digest in saved.items() if digest}  # adapters saved on other machines
        save_checkpoint(self.run_dir, round_index, self.parties, self.summary, adapter_sha256=hashes)

    def restore(self, state: Optional[dict] = None) -> int:
        """Load the last complete round checkpoint from `run_dir`; returns the round to start at.

        `state` is the record `read_checkpoint` already read (and `check_resumable` accepted).
        """
        state = read_checkpoint(self.run_dir) if state is None else state
        self.summary = restore_checkpoint(self.run_dir, self.parties, self.config, state)
        return int(state["round"]) + 1

    # ---- helpers --------------------------------------------------------------------------

    def _send(self, payload: KnowledgePayload, receivers: list[FederatedParty]) -> KnowledgePayload:
        """Serialise once, count bytes on both ends, and hand receivers a validated copy."""
        data = payload.to_bytes()
        self._traffic[payload.sender]["bytes_sent"] += len(data) * len(receivers)
        for receiver in receivers:
            self._traffic[receiver.name]["bytes_received"] += len(data)
        limit = payload_byte_limit(self.num_public, self.config.data.max_length, self.config.transfer.top_k)
        return KnowledgePayload.from_bytes(data, max_bytes=limit, num_public=self.num_public)

    def _write_summary(self) -> None:
        write_summary(self.run_dir, self.summary)

    def _log(self, stats: dict[str, dict], step: int) -> None:
        log_metrics(self.loggers, stats, step)

    def results_table(self) -> str:
        """Score per party per round (round 0 = zero-shot) as a markdown table (see `summary.results_table`)."""
        return results_table(self.summary, [party.name for party in self.parties])
