"""The ClientApp: one phase (and those that follow) of one client per Flower Message.

Flower starts a fresh ClientApp process for every message. This one stays light (no torch): it
reads the request and the node's own settings (`node.py`), and hands the request with the client's
state from `context.state` to the node's long-lived worker (`worker.py`), which keeps the built
party in memory between messages; with `keep-alive-s: 0` it answers the request itself. Either way
`client_phases.answer` runs the phase on the client's real `Participant` (the same split, seeds and
LoRA init as the in-process backend), and the new state goes back into `context.state`.

State (Flower keeps `context.state` on the SuperNode between messages of a run):
  adapter_model.safetensors, adapter_config.json   the LoRA adapter as `save_adapter` writes it
  public_losses                                    this party's own public-data CE, while valid
Every round the adapter, the cached losses and the round are also written under the node's
output folder (`save_adapter`), from where `load_adapter` restores them after a restart.

Private data never leaves the node; weights leave it only for the fedavg baseline.
"""

from __future__ import annotations

import os
from typing import Optional

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmkt.federation.flower.messages import (
    PHASE_MESSAGE_TYPES,
    Reply,
    array_bytes,
    bytes_array,
    decode_request,
    encode_reply,
)
from fedmkt.federation.flower.node import node_settings
from fedmkt.federation.flower.worker import Job, call

STATE_KEY = "fedmkt.client_state"
"""The `context.state` record that holds the client's adapter and cached public losses."""

app = ClientApp()


def handle(message: Message, context: Context) -> Message:
    """Run the requested phase for this node's client and reply with its result."""
    request = decode_request(message.content)
    settings = node_settings(context.node_config)
    if request.phase == "hello" and not (request.config_text and settings.client in request.tokenizers):
        reply = Reply(info={"client": settings.client, "node_id": context.node_id})
        return Message(encode_reply(reply), reply_to=message)
    state = read_state(context)
    if settings.keep_alive_s > 0:
        job = Job(request, settings, state, context.node_id, context.run_id, os.getppid(), os.getpid())
        reply, new_state = call(job)
    else:  # this process answers, and builds the party afresh for this one message
        from fedmkt.federation.flower.client_phases import PartyCache, answer  # torch: only when needed here

        reply, new_state = answer(request, settings, state, context.node_id, PartyCache(), context.run_id)
    if new_state is not None and new_state is not state:
        write_state(context, new_state)
    return Message(encode_reply(reply), reply_to=message)


for _phase, _message_type in PHASE_MESSAGE_TYPES.items():  # one handler, routed by message type
    _category, _action = _message_type.split(".")
    getattr(app, _category)(_action)(handle)


def read_state(context: Context) -> Optional[dict[str, bytes]]:
    """The client's state blobs from `context.state` (None before its first stateful phase)."""
    if STATE_KEY not in context.state.array_records:
        return None
    return {name: array_bytes(array) for name, array in context.state.array_records[STATE_KEY].items()}


def write_state(context: Context, state: dict[str, bytes]) -> None:
    context.state[STATE_KEY] = ArrayRecord({name: bytes_array(blob) for name, blob in state.items()})
