"""`RemoteParticipant`: a client as the `FederatedTrainer` sees it, its phases run on a SuperNode.

It offers the interface of `fedmkt.federation.participant.Participant` that the trainer calls,
so the trainer runs unchanged: each call becomes one Flower Message to the client's SuperNode,
and the reply becomes the call's return value. `run_together` is the trainer's stage runner on
this backend: one phase for every client goes out as one batch of messages, so the clients work
at the same time, and each reply is mapped back to its client. Knowledge payloads arrive as the bytes the client
serialised and are validated here, at the network boundary. Weights cross the wire only for the
fedavg baseline (`adapter_state` / `load_adapter_state`); `save_adapter` makes the node write its
adapter into its own output folder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import PHASE_MESSAGE_TYPES, Reply, Request, decode_reply, encode_request
from fedmkt.federation.stages import Outcome
from fedmkt.payload import KnowledgePayload

DEFAULT_CLIENT_TIMEOUT_S = 3600.0
"""`federation.client_timeout_s` on the flower backend when the config leaves it null: a node that
died is given up on after an hour, not after Flower's 12-hour message lifetime."""

STARTUP_ALLOWANCE_S = 300.0
"""Time a ClientApp may spend starting and rebuilding its party on top of
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

    # ---- one phase call as a message, and its reply as the call's value -----------------------

    def message(self, phase: str, *args: Any) -> Message:
        """The Flower Message that asks this client's node to run `phase(*args)`."""
        round_index, path, blobs = 0, "", {}
        if phase in ("fine_tune", "share_knowledge"):
            (round_index,) = args
        elif phase == "distill":
            round_index, teachers = args
            blobs = {f"payload/{name}": payload.to_bytes() for name, payload in teachers.items()}
        elif phase == "save_adapter":
            path = self._relative(Path(args[0]))
        elif phase == "load_adapter_state":
            blobs = {"adapter": save_safetensors({k: v.contiguous() for k, v in args[0].items()})}
        request = Request(
            phase=phase,
            client=self.name,
            config_text=self.config_text,
            round=round_index,
            path=path,
            blobs=blobs,
            tokenizers={self.name: self.tokenizer} if self.tokenizer else {},
        )
        return Message(
            content=encode_request(request),
            dst_node_id=self.node_id,
            message_type=PHASE_MESSAGE_TYPES[phase],
            group_id=str(round_index),
            ttl=None if self.timeout_s is None else self.timeout_s + _TTL_MARGIN_S,
        )

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
        if phase in ("save_adapter", "load_adapter_state"):
            return None, answer.info
        return answer.stats, answer.info

    def _call(self, phase: str, *args: Any) -> Any:
        outcome = run_together(phase, [(self, args)])[self.name]
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def _payload(self, answer: Reply) -> KnowledgePayload:
        if "payload" not in answer.blobs:
            raise RemoteParticipantError(f"{self.name}: share_knowledge replied without a payload")
        payload = KnowledgePayload.from_bytes(answer.blobs["payload"], num_public=self.num_public)
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

    def fine_tune(self, round_index: int) -> dict:
        return self._call("fine_tune", round_index)

    def share_knowledge(self, round_index: int) -> KnowledgePayload:
        return self._call("share_knowledge", round_index)

    def distill(self, round_index: int, teacher_payloads: dict[str, KnowledgePayload]) -> dict:
        return self._call("distill", round_index, teacher_payloads)

    def evaluate(self) -> dict:
        return self._call("evaluate")

    # ---- state ------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The client's LoRA weights (fedavg baseline only: the one mode where weights travel)."""
        return self._call("adapter_state")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self._call("load_adapter_state", state)

    def save_adapter(self, directory: Path) -> None:
        """The node writes its adapter to the same place under its own output folder."""
        self._call("save_adapter", Path(directory))

    def cached_public_losses(self) -> Optional[torch.Tensor]:
        """Kept on the node; the server never holds a client's losses (so none are checkpointed)."""
        return None

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        if losses is not None:
            raise FedMKTError(_NO_RESUME)

    def load_adapter(self, directory: Path) -> None:
        raise FedMKTError(_NO_RESUME)


_TTL_MARGIN_S = 60.0
"""A message outlives the server's wait by this much, so a late reply is dropped by the SuperLink, not lost mid-way."""


def run_together(phase: str, calls: Sequence[tuple[RemoteParticipant, tuple]]) -> dict[str, Outcome]:
    """The trainer's stage runner on Flower: `phase` for every client in one `send_and_receive`.

    All messages leave together, so the clients' nodes work in parallel; replies are collected as
    they arrive until every client answered or the longest client timeout passed. A reply is
    matched to its client by the node it came from. A client's span is the time its node reports
    for the phase (its own clock), or the server's wait when the node reported none.
    """
    if not calls:
        return {}
    grid = calls[0][0].grid
    by_node = {client.node_id: client for client, _ in calls}
    messages = [client.message(phase, *args) for client, args in calls]
    timeouts = [client.timeout_s for client, _ in calls]
    sent = time.time()
    replies = grid.send_and_receive(messages, timeout=None if None in timeouts else max(timeouts))
    received = time.time()
    answers: dict[int, Message] = {}
    for reply in replies:
        if reply.metadata.src_node_id in by_node:
            answers.setdefault(reply.metadata.src_node_id, reply)
    outcomes = {}
    for client, _ in calls:
        outcome = Outcome(start=sent, end=received)
        try:
            outcome.value, info = client.result(phase, answers.get(client.node_id))
            if "start" in info and "end" in info:
                outcome.start, outcome.end = float(info["start"]), float(info["end"])
        except Exception as error:  # this client failed or sent something unusable; the others go on
            outcome.error = error
        outcomes[client.name] = outcome
    return outcomes


_NO_RESUME = (
    "--resume is not supported on the flower backend (each client's adapter lives on its SuperNode). "
    "Fix: start the run afresh, or use --backend inprocess to resume."
)
