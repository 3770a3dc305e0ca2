"""The ClientApp: one phase of one client per Flower Message, the client's state kept on its node.

Flower starts a fresh ClientApp process for every message, so each phase call rebuilds the
client's real `Participant` with `fedmkt.run.build_participant` (the same split, seeds and LoRA
init as the in-process backend; base models come from the local cache), restores the state the
previous phase left in `context.state`, runs the method the server asked for and stores the new
state. Phases reseed themselves, so a rebuilt party with its restored adapter and cached public
losses computes exactly what a long-lived in-process party would.

State (Flower keeps `context.state` on the SuperNode between messages of a run):
  adapter_model.safetensors, adapter_config.json   the LoRA adapter as `save_adapter` writes it
  public_losses                                    this party's own public-data CE, while valid

Private data never leaves the node; weights leave it only for the fedavg baseline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import (
    PHASE_MESSAGE_TYPES,
    Reply,
    Request,
    array_bytes,
    bytes_array,
    client_of_node,
    decode_request,
    encode_reply,
)

STATE_KEY = "fedmkt.client_state"
"""The `context.state` record that holds the client's adapter and cached public losses."""

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_READ_ONLY = {"evaluate", "adapter_state"}  # phases that change neither the adapter nor the cached losses

app = ClientApp()


def handle(message: Message, context: Context) -> Message:
    """Run the requested phase for this node's client and reply with its result."""
    request = decode_request(message.content)
    if request.phase == "hello":  # cheap: no model is built
        reply = Reply(info={"client": client_of_node(context.node_config), "node_id": context.node_id})
        return Message(encode_reply(reply), reply_to=message)
    client = client_of_node(context.node_config)
    if request.client != client:
        raise FedMKTError(
            f"a message for {request.client} reached the SuperNode of {client}. Fix: give every SuperNode its own partition-id."
        )
    if request.phase == "save_adapter":  # copies the stored adapter; no model is built
        _write_adapter(context, _output_dir(request, context) / request.path)
        return Message(encode_reply(Reply()), reply_to=message)
    reply = run_phase(request, context)
    return Message(encode_reply(reply), reply_to=message)


for _phase, _message_type in PHASE_MESSAGE_TYPES.items():  # one handler, routed by message type
    _category, _action = _message_type.split(".")
    getattr(app, _category)(_action)(handle)


def run_phase(request: Request, context: Context) -> Reply:
    """Rebuild the client, restore its state, call the phase, store the new state."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from fedmkt.config import run_config_from_text
    from fedmkt.payload import KnowledgePayload
    from fedmkt.run import build_participant, quiet_lightning

    config = run_config_from_text(request.config_text)
    quiet_lightning()
    participant = build_participant(config, request.client)
    _restore_state(participant, context)

    reply = Reply()
    if request.phase == "fine_tune":
        reply.stats = asdict(participant.fine_tune(request.round))
    elif request.phase == "share_knowledge":
        reply.blobs["payload"] = participant.share_knowledge(request.round).to_bytes()
    elif request.phase == "distill":
        num_public = len(participant.data.public)
        teachers = {
            name.split("/", 1)[1]: KnowledgePayload.from_bytes(data, num_public=num_public)
            for name, data in request.blobs.items()
            if name.startswith("payload/")
        }
        reply.stats = asdict(participant.distill(request.round, teachers))
    elif request.phase == "evaluate":
        reply.stats = participant.evaluate()
    elif request.phase == "adapter_state":
        reply.blobs["adapter"] = save_safetensors({k: v.contiguous() for k, v in participant.adapter_state().items()})
    elif request.phase == "load_adapter_state":
        participant.load_adapter_state(load_safetensors(request.blobs["adapter"]))
    else:
        raise FedMKTError(f"unknown phase {request.phase}. Fix: run the same fedmkt version on every machine.")
    if request.phase not in _READ_ONLY:
        _store_state(participant, context)
    return reply


def _restore_state(participant, context: Context) -> None:
    """Adapter and cached public losses left by this client's previous phase (none before its first)."""
    if STATE_KEY not in context.state.array_records:
        return
    from safetensors.torch import load as load_safetensors

    record = context.state.array_records[STATE_KEY]
    participant.load_adapter_state(load_safetensors(array_bytes(record["adapter_model.safetensors"])))
    losses = record.get("public_losses")
    participant.restore_public_losses(load_safetensors(array_bytes(losses))["losses"] if losses is not None else None)


def _store_state(participant, context: Context) -> None:
    """Save the adapter exactly as `Participant.save_adapter` writes it, plus the cached losses."""
    from safetensors.torch import save as save_safetensors

    record = ArrayRecord()
    with tempfile.TemporaryDirectory(prefix="fedmkt-adapter-") as tmp:
        participant.save_adapter(Path(tmp) / "adapter")
        for name in _ADAPTER_FILES:
            record[name] = bytes_array((Path(tmp) / "adapter" / name).read_bytes())
    losses = participant.cached_public_losses()
    if losses is not None:
        record["public_losses"] = bytes_array(save_safetensors({"losses": losses.contiguous()}))
    context.state[STATE_KEY] = record


def _output_dir(request: Request, context: Context) -> Path:
    """This node's folder for saved adapters: node-config `output-dir`, else the config's run_dir."""
    folder = context.node_config.get("output-dir") or yaml.safe_load(request.config_text).get("run_dir")
    return Path(str(folder)).expanduser()


def _write_adapter(context: Context, directory: Path) -> None:
    """Write the stored adapter folder atomically (temporary folder, then rename)."""
    if STATE_KEY not in context.state.array_records:
        raise FedMKTError(
            "this client has no adapter yet (no phase ran on this SuperNode in this run). Fix: check the SuperNode's logs."
        )
    record = context.state.array_records[STATE_KEY]
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    for name in _ADAPTER_FILES:
        (tmp / name).write_bytes(array_bytes(record[name]))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
