"""`RemoteParticipant`: a client as the `FederatedTrainer` sees it, its phases run on a SuperNode.

It implements `fedmkt.federation.protocol.FederatedParty`, what the trainer calls on a party,
so the trainer runs unchanged: each call becomes one Flower Message to the client's SuperNode,
and the reply becomes the call's return value. Knowledge payloads arrive as the bytes the client
serialised and are validated here, at the network boundary. Weights cross the wire only for the
fedavg baseline (`adapter_state` / `load_adapter_state`); `save_adapter` makes the node write its
adapter into its own output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import PHASE_MESSAGE_TYPES, Reply, Request, decode_reply, encode_request
from fedmkt.federation.protocol import PhaseStats
from fedmkt.payload import KnowledgePayload

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
    ) -> None:
        self.name = name
        self.node_id = node_id
        self.grid = grid
        self.config_text = config_text
        self.run_dir = Path(run_dir)
        self.num_public = num_public
        self.timeout_s = timeout_s

    def _call(
        self, phase: str, round_index: int = 0, path: str = "", blobs: Optional[dict[str, bytes]] = None
    ) -> Reply:
        request = Request(
            phase=phase, client=self.name, config_text=self.config_text, round=round_index, path=path, blobs=blobs or {}
        )
        message = Message(
            content=encode_request(request),
            dst_node_id=self.node_id,
            message_type=PHASE_MESSAGE_TYPES[phase],
            group_id=str(round_index),
        )
        replies = list(self.grid.send_and_receive([message], timeout=self.timeout_s))
        if not replies:
            raise RemoteParticipantError(
                f"{self.name}: no reply to {phase} from SuperNode {self.node_id} within {self.timeout_s} s"
            )
        reply = replies[0]
        if reply.has_error():
            reason = " ".join(str(reply.error.reason).split())
            raise RemoteParticipantError(
                f"{self.name}: {phase} failed on SuperNode {self.node_id} (error {reply.error.code}): {reason}"
            )
        return decode_reply(reply.content)

    # ---- the phases the FederatedTrainer calls ----------------------------------------------

    def fine_tune(self, round_index: int) -> PhaseStats:
        return PhaseStats(**self._call("fine_tune", round_index).stats)

    def share_knowledge(self, round_index: int) -> KnowledgePayload:
        blobs = self._call("share_knowledge", round_index).blobs
        if "payload" not in blobs:
            raise RemoteParticipantError(f"{self.name}: share_knowledge replied without a payload")
        payload = KnowledgePayload.from_bytes(blobs["payload"], num_public=self.num_public)
        if payload.sender != self.name:
            raise FedMKTError(
                f"rejected payload: {self.name}'s SuperNode sent knowledge signed by {payload.sender}. Fix: check that node's --node-config partition-id."
            )
        return payload

    def distill(self, round_index: int, teacher_payloads: dict[str, KnowledgePayload]) -> PhaseStats:
        blobs = {f"payload/{name}": payload.to_bytes() for name, payload in teacher_payloads.items()}
        return PhaseStats(**self._call("distill", round_index, blobs=blobs).stats)

    def evaluate(self) -> dict:
        return self._call("evaluate").stats

    # ---- state ------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The client's LoRA weights (fedavg baseline only: the one mode where weights travel)."""
        return load_safetensors(self._call("adapter_state").blobs["adapter"])

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self._call(
            "load_adapter_state", blobs={"adapter": save_safetensors({k: v.contiguous() for k, v in state.items()})}
        )

    def save_adapter(self, directory: Path) -> None:
        """The node writes its adapter to the same place under its own output folder."""
        directory = Path(directory)
        try:
            relative = directory.relative_to(self.run_dir)
        except ValueError:
            relative = Path(directory.name)
        self._call("save_adapter", path=relative.as_posix())

    def cached_public_losses(self) -> Optional[torch.Tensor]:
        """Kept on the node; the server never holds a client's losses (so none are checkpointed)."""
        return None

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        if losses is not None:
            raise FedMKTError(_NO_RESUME)

    def load_adapter(self, directory: Path) -> None:
        raise FedMKTError(_NO_RESUME)


_NO_RESUME = (
    "--resume is not supported on the flower backend (each client's adapter lives on its SuperNode). "
    "Fix: start the run afresh, or use --backend inprocess to resume."
)
