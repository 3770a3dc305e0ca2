"""`RemoteParticipant`: a client as the `FederatedTrainer` sees it, its phases run on a SuperNode.

It implements `fedmkt.federation.protocol.FederatedParty`, what the trainer calls on a party,
so the trainer runs unchanged: each call becomes one Flower Message to the client's SuperNode,
and the reply becomes the call's return value. `FlowerStages` is the trainer's stage runner on
this backend: one phase for every client goes out as one batch of messages (`run_together`), so
the clients work at the same time, each reply is mapped back to its client, and the phases that
always come next ride in the same message. Knowledge payloads arrive as the bytes the client
serialised and are validated here, at the network boundary. Weights cross the wire only for the
fedavg baseline (`adapter_state` / `load_adapter_state`); `save_adapter` makes the node write its
adapter into its own output folder, and `load_adapter` makes it restore one from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.checkpoint import read_checkpoint
from fedmkt.federation.client_stages import Outcome
from fedmkt.federation.flower.discovery import ask_nodes
from fedmkt.federation.flower.messages import (
    PHASE_MESSAGE_TYPES,
    Reply,
    Request,
    decode_reply,
    encode_request,
    exchange,
)
from fedmkt.federation.protocol import PhaseStats
from fedmkt.federation.trainer import RoundPlan
from fedmkt.payload import KnowledgePayload

DEFAULT_CLIENT_TIMEOUT_S = 3600.0
"""`federation.client_timeout_s` on the flower backend when the config leaves it null: a node that
died is given up on after an hour, not after Flower's 12-hour message lifetime."""

STARTUP_ALLOWANCE_S = 300.0
"""Time a node may spend starting its worker and building its party on top of
`federation.client_timeout_s` before the server stops waiting for its reply."""


class RemoteParticipantError(RuntimeError):
    """A phase failed on the client's SuperNode (or no reply came); the trainer leaves the client out."""


class RemoteParticipant:
    """Server-side stand-in for one client whose model and private data stay on its SuperNode."""

    def __init__(
        self,
        name: str,
        node_id: int,
        grid: Grid,
        config_text: str,
        run_dir: Path,
        num_public: int,
        timeout_s: Optional[float] = None,
        tokenizer: str = "",
        max_payload_bytes: Optional[int] = None,
    ) -> None:
        self.name = name
        self.node_id = node_id
        self.grid = grid
        self.config_text = config_text
        self.run_dir = Path(run_dir)
        self.num_public = num_public
        self.timeout_s = timeout_s
        self.tokenizer = tokenizer
        """Fingerprint of the tokenizer this client must use (checked on its node; empty: not checked)."""
        self.max_payload_bytes = max_payload_bytes
        """The largest payload this client may send (`fedmkt.received.payload_byte_limit`); refused unread above it."""
        self.stateful = False
        """Whether this client's node holds state of this run (its node then refuses to start afresh)."""

    # ---- one phase call as a message, and its reply as the call's value -----------------------

    def message(self, phase: str, *args: Any, then: Sequence[str] = (), path: str = "") -> Message:
        """The Flower Message that asks this client's node to run `phase(*args)`, then the phases
        `then` on the same party (`path`: where a following save_adapter writes)."""
        round_index, blobs, sha256 = 0, {}, ""
        if phase in ("fine_tune", "share_knowledge"):
            (round_index,) = args
        elif phase == "distill":
            round_index, teachers = args
            blobs = {f"payload/{name}": payload.to_bytes() for name, payload in teachers.items()}
        elif phase == "save_adapter":
            path = self._relative(Path(args[0]))
        elif phase == "load_adapter":
            path, sha256 = self._relative(Path(args[0])), args[1]
        elif phase == "load_adapter_state":
            blobs = {"adapter": save_safetensors({k: v.contiguous() for k, v in args[0].items()})}
        request = Request(
            phase=phase,
            client=self.name,
            config_text=self.config_text,
            round=round_index,
            path=path,
            run=self.run_dir.name,
            blobs=blobs,
            tokenizers={self.name: self.tokenizer} if self.tokenizer else {},
            then=list(then),
            fresh=not self.stateful,
            sha256=sha256,
        )
        wait = self.wait_s(len(then))
        return Message(
            content=encode_request(request),
            dst_node_id=self.node_id,
            message_type=PHASE_MESSAGE_TYPES[phase],
            group_id=str(round_index),
            ttl=None if wait is None else wait + _TTL_MARGIN_S,
        )

    def wait_s(self, following: int = 0) -> Optional[float]:
        """How long the server waits for a message that runs 1 + `following` phases (None: no limit)."""
        return None if self.timeout_s is None else self.timeout_s * (1 + following)

    def result(self, phase: str, reply: Optional[Message]) -> tuple[Any, dict]:
        """(the value `phase` returns, the node's facts about the call) from its reply (None: no reply
        in time); raises if the phase failed."""
        if reply is None:
            raise RemoteParticipantError(
                f"{self.name}: no reply to {phase} from SuperNode {self.node_id} within {self.timeout_s} s"
            )
        if reply.has_error():
            reason = " ".join(str(reply.error.reason).split())
            raise RemoteParticipantError(
                f"{self.name}: {phase} failed on SuperNode {self.node_id} (error {reply.error.code}): {reason}"
            )
        answer = decode_reply(reply.content)
        if phase == "share_knowledge":
            return self._payload(answer), answer.info
        if phase == "adapter_state":
            return load_safetensors(answer.blobs["adapter"]), answer.info
        if phase == "save_adapter":
            return answer.info.get("sha256"), answer.info
        if phase in ("load_adapter", "load_adapter_state"):
            return None, answer.info
        if phase in ("fine_tune", "distill"):
            return PhaseStats(**answer.stats), answer.info
        return answer.stats, answer.info

    def _call(self, phase: str, *args: Any) -> Any:
        outcome = run_together(phase, [(self, args)])[self.name]
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def _payload(self, answer: Reply) -> KnowledgePayload:
        if "payload" not in answer.blobs:
            raise RemoteParticipantError(f"{self.name}: share_knowledge replied without a payload")
        payload = KnowledgePayload.from_bytes(
            answer.blobs["payload"], max_bytes=self.max_payload_bytes, num_public=self.num_public
        )
        if payload.sender != self.name:
            raise FedMKTError(
                f"rejected payload: {self.name}'s SuperNode sent knowledge signed by {payload.sender}. Fix: check that node's --node-config partition-id."
            )
        return payload

    def _relative(self, directory: Path) -> str:
        """Where the node writes, relative to its own output folder (the node decides the folder)."""
        try:
            return directory.relative_to(self.run_dir).as_posix()
        except ValueError:
            return directory.name

    # ---- the phases the FederatedTrainer calls ----------------------------------------------

    def fine_tune(self, round_index: int) -> PhaseStats:
        return self._call("fine_tune", round_index)

    def share_knowledge(self, round_index: int) -> KnowledgePayload:
        return self._call("share_knowledge", round_index)

    def distill(self, round_index: int, teacher_payloads: dict[str, KnowledgePayload]) -> PhaseStats:
        return self._call("distill", round_index, teacher_payloads)

    def evaluate(self) -> dict:
        return self._call("evaluate")

    # ---- state ------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The client's LoRA weights (fedavg baseline only: the one mode where weights travel)."""
        return self._call("adapter_state")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self._call("load_adapter_state", state)

    def save_adapter(self, directory: Path) -> Optional[str]:
        """The node writes its adapter to the same place under its own output folder; returns the
        sha256 of its weights (recorded in the server's checkpoint)."""
        return self._call("save_adapter", Path(directory))

    def cached_public_losses(self) -> Optional[torch.Tensor]:
        """Kept on the node; the server never holds a client's losses (so none are checkpointed)."""
        return None

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        """Nothing to restore: a client's losses stay on its node and are recomputed after a restore."""
        if losses is not None:
            raise FedMKTError(
                f"{self.name}'s public losses never reach the server. Fix: resume with the same fedmkt version."
            )

    def load_adapter(self, directory: Path) -> None:
        """Make the node adopt the adapter it saved in `directory` (under its own output folder),
        checked against the hash the server's checkpoint recorded for it."""
        recorded = read_checkpoint(self.run_dir).get("adapter_sha256", {})
        if self.name not in recorded:
            raise FedMKTError(
                f"the checkpoint in {self.run_dir} records no adapter hash for {self.name} (written by an older fedmkt). "
                "Fix: start the run afresh with --overwrite."
            )
        try:
            self._call("load_adapter", Path(directory), recorded[self.name])
        except RemoteParticipantError as error:
            raise FedMKTError(
                f"{error}. Fix: start {self.name}'s SuperNode with the output-dir of the interrupted run."
            ) from None


STATEFUL_PHASES = ("fine_tune", "share_knowledge", "distill", "load_adapter", "load_adapter_state")
"""Phases after which a client's node holds state of this run."""

_TTL_MARGIN_S = 60.0
"""A message outlives the server's wait by this much, so a late reply is dropped by the SuperLink, not lost mid-way."""


def run_together(
    phase: str,
    calls: Sequence[tuple[RemoteParticipant, tuple]],
    then: Sequence[str] = (),
    path: Optional[Callable[[RemoteParticipant], str]] = None,
) -> dict[str, Outcome]:
    """The trainer's stage runner on Flower: `phase` for every client in one `exchange`.

    All messages leave together, so the clients' nodes work in parallel; replies are collected as
    they arrive until every client answered or the longest client timeout passed. A reply is
    matched to its client by the message it answers. A client's span is the time its node reports
    for the phase (its own clock), or the server's wait when the node reported none. With `then`,
    each node runs those phases right after on the same party (`path(client)`: where a following
    save_adapter writes); their outcomes come back as `Outcome.followed`.
    """
    if not calls:
        return {}
    grid = calls[0][0].grid
    by_node = {client.node_id: client for client, _ in calls}
    messages = [client.message(phase, *args, then=then, path=path(client) if path else "") for client, args in calls]
    timeouts = [client.wait_s(len(then)) for client, _ in calls]
    sent = time.time()
    replies = exchange(grid, messages, None if None in timeouts else max(timeouts))
    received = time.time()
    # Pushing gave each message its id. A reply names the message it answers; the SuperLink's own
    # error replies (e.g. "node unavailable") come from the SuperLink, not from the client's node.
    by_message = {m.metadata.message_id: client for m, (client, _) in zip(messages, calls) if m.metadata.message_id}
    answers: dict[str, Message] = {}
    for reply in replies:
        client = by_message.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
        if client is not None:
            answers.setdefault(client.name, reply)
    outcomes = {}
    for client, _ in calls:
        outcome = Outcome(start=sent, end=received)
        try:
            reply = answers.get(client.name)
            outcome.value, info = client.result(phase, reply)
            if "start" in info and "end" in info:
                outcome.start, outcome.end, outcome.sent = float(info["start"]), float(info["end"]), sent
            outcome.followed = _followed(client, info.get("then", {}), reply)
            client.stateful |= phase in STATEFUL_PHASES
        except Exception as error:  # this client failed or sent something unusable; the others go on
            outcome.error = error
        outcomes[client.name] = outcome
    return outcomes


def _followed(client: RemoteParticipant, then: dict, reply: Message) -> dict[str, Outcome]:
    """The outcomes of the phases a node ran after the requested one, from its reply."""
    followed = {}
    for phase, entry in then.items():
        outcome = Outcome(start=float(entry["start"]), end=float(entry["end"]))
        if "error" in entry:
            outcome.error = RemoteParticipantError(
                f"{client.name}: {phase} failed on SuperNode {client.node_id}: {entry['error']}"
            )
        elif phase == "share_knowledge":
            try:
                outcome.value = client._payload(decode_reply(reply.content))
            except Exception as error:  # a payload refused at the boundary is that phase's failure
                outcome.error = error
        elif phase == "evaluate":
            outcome.value = entry["stats"]
        else:  # save_adapter
            outcome.value = entry.get("sha256")
        followed[phase] = outcome
    return followed


class FlowerStages:
    """The trainer's stage runner on Flower, with fewer messages: at most two per client per round
    on the training path.

    Each message costs a fresh ClientApp process on its node and two polls, so phases that the
    protocol always runs next go in the same message: fine-tune is followed by
    share-knowledge (modes that share), distill by evaluate (in rounds that evaluate) and
    save-adapter (not fedavg, whose averaging comes between). Their outcomes are kept until the
    trainer asks for that phase, and then returned without another message. Anything else, or any
    other message to that client, sends as usual, so a guess that does not come true costs time,
    never a result.
    """

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        self.config = config
        self.plan = RoundPlan.of(config)
        self.run_dir = Path(run_dir)
        self._ahead: dict[str, dict[tuple, Outcome]] = {}

    def follow_ups(self, phase: str, args: tuple) -> tuple[str, ...]:
        """The phases that will run after `phase(*args)` for a client: the trainer's plan says (`RoundPlan`)."""
        round_index = args[0] if args and isinstance(args[0], int) else 0
        return self.plan.client_follow_ups(phase, round_index)

    def _adapter_path(self, client: RemoteParticipant, round_index: int) -> str:
        return client._relative(self.run_dir / "adapters" / f"round_{round_index}" / client.name)

    @staticmethod
    def _key(client: RemoteParticipant, phase: str, args: tuple) -> tuple:
        if phase == "share_knowledge":
            return (phase, args[0])
        if phase == "save_adapter":
            return (phase, client._relative(Path(args[0])))
        return (phase,)

    def rejoin(self, clients: Sequence[RemoteParticipant], round_index: int) -> dict[str, Outcome]:
        """Before a round: a client whose node left the SuperLink is looked for among the nodes that
        joined since (a SuperNode restarted with the same partition-id), and its node restores the
        adapter of the last round from its own folder. Returns the failures of clients that could not
        be restored, so they are left out of the round rather than start over silently."""
        grid = clients[0].grid
        connected = set(grid.get_node_ids())
        gone = [client for client in clients if client.node_id not in connected]
        newcomers = connected - {client.node_id for client in clients}
        if not gone or not newcomers:
            return {}
        tokenizers = {client.name: client.tokenizer for client in gone if client.tokenizer}
        wait = self.config.flower.wait_for_nodes_s
        nodes, _, _ = ask_nodes(grid, sorted(newcomers), gone[0].config_text, tokenizers, wait)
        failures = {}
        for client in gone:
            if client.name not in nodes:
                continue
            # After round 1 the new node must hold the last round's adapter: until it restored one
            # it refuses to train (stateful), rather than start over from its initial adapter.
            client.node_id, client.stateful = nodes[client.name], round_index > 1
            self._ahead.pop(client.name, None)
            if round_index > 1:
                started = time.time()
                try:
                    client.load_adapter(self.run_dir / "adapters" / f"round_{round_index - 1}" / client.name)
                except FedMKTError as error:
                    failures[client.name] = Outcome(error=error, start=started, end=time.time())
        return failures

    def __call__(self, phase: str, calls: Sequence[tuple[RemoteParticipant, tuple]]) -> dict[str, Outcome]:
        outcomes = (
            self.rejoin([client for client, _ in calls], calls[0][1][0]) if phase == "fine_tune" and calls else {}
        )
        calls = [(client, args) for client, args in calls if client.name not in outcomes]
        to_send = []
        for client, args in calls:
            ahead = self._ahead.get(client.name, {})
            hit = ahead.pop(self._key(client, phase, args), None)
            if hit is not None:
                outcomes[client.name] = hit
            else:
                self._ahead.pop(client.name, None)  # this message changes or supersedes what was run ahead
                to_send.append((client, args))
        groups: dict[tuple, list] = {}
        for client, args in to_send:  # one batch per sequence of phases (they agree within a stage)
            groups.setdefault(self.follow_ups(phase, args), []).append((client, args))
        for then, group in groups.items():
            round_index = group[0][1][0] if phase in ("fine_tune", "share_knowledge", "distill") else 0
            sent = run_together(phase, group, then, path=lambda c, r=round_index: self._adapter_path(c, r))
            for client, _ in group:
                outcome = sent[client.name]
                ahead = self._ahead.setdefault(client.name, {})
                for name, followed in outcome.followed.items():
                    args = (round_index,) if name == "share_knowledge" else ()
                    if name == "save_adapter":
                        args = (self.run_dir / "adapters" / f"round_{round_index}" / client.name,)
                    ahead[self._key(client, name, args)] = followed
                outcome.followed = {}
                outcomes[client.name] = outcome
        return outcomes
