"""The ClientApp: one phase of one client per Flower Message, the client's state kept on its node.

Flower starts a fresh ClientApp process for every message, so each phase call rebuilds the
client's real `Participant` with `fedmkt.run.build_participant` (the same split, seeds and LoRA
init as the in-process backend; base models come from the local cache), restores the state the
previous phase left in `context.state`, runs the method the server asked for and stores the new
state. The client's private data, model and output folder are this node's own (`node.py`); the
server sends only the shared config, and the node refuses to run with a tokenizer other than the
one the run expects. Phases reseed themselves, so a rebuilt party with its restored adapter and
cached public losses computes exactly what a long-lived in-process party would. A message may ask
for the phases that follow (`request.then`), which then run on the same rebuilt party.

State (Flower keeps `context.state` on the SuperNode between messages of a run):
  adapter_model.safetensors, adapter_config.json   the LoRA adapter as `save_adapter` writes it
  public_losses                                    this party's own public-data CE, while valid
Every round the adapter is also written under the node's output folder (`save_adapter`), from
where `load_adapter` restores it after a restart.

Private data never leaves the node; weights leave it only for the fedavg baseline.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.alignment.vocab_map import tokenizer_fingerprint
from fedmkt.config import RunConfig, run_config_from_text
from fedmkt.errors import FedMKTError, describe
from fedmkt.federation.files import atomic_write_bytes
from fedmkt.federation.flower.messages import (
    PHASE_MESSAGE_TYPES,
    Reply,
    Request,
    array_bytes,
    bytes_array,
    decode_request,
    encode_reply,
)
from fedmkt.federation.flower.node import NodeSettings, apply_to_config, inside_output_dir, node_settings
from fedmkt.models import load_tokenizer
from fedmkt.payload import KnowledgePayload
from fedmkt.run import build_participant, quiet_lightning

STATE_KEY = "fedmkt.client_state"
"""The `context.state` record that holds the client's adapter and cached public losses."""

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_READ_ONLY = {"evaluate", "adapter_state"}  # phases that change neither the adapter nor the cached losses

FOLLOW_UPS = {
    "fine_tune": (("share_knowledge",),),
    "distill": (("evaluate", "save_adapter"), ("save_adapter",)),
}
"""Phase → the sequences of phases that may follow it in the same message (see proxy.FlowerStages)."""

app = ClientApp()


def handle(message: Message, context: Context) -> Message:
    """Run the requested phase for this node's client and reply with its result."""
    request = decode_request(message.content)
    settings = node_settings(context.node_config)
    if request.phase == "hello":  # no model is built; the tokenizer is checked when the run sends one
        if request.config_text and settings.client in request.tokenizers:
            check_tokenizer(settings, node_config(settings, request), request.tokenizers[settings.client])
        reply = Reply(info={"client": settings.client, "node_id": context.node_id})
        return Message(encode_reply(reply), reply_to=message)
    if request.client != settings.client:
        raise FedMKTError(
            f"a message for {request.client} reached the SuperNode of {settings.client}. Fix: give every SuperNode its own partition-id."
        )
    if not request.fresh and STATE_KEY not in context.state.array_records and request.phase != "load_adapter":
        raise FedMKTError(
            f"this SuperNode holds no adapter of {settings.client} for this run, though the run trained one here "
            "(the SuperNode restarted?). Fix: the ServerApp restores it when the restarted node joins between rounds; "
            "otherwise resume the run (--resume RUN_DIR) with this node's output-dir unchanged."
        )
    start = time.time()
    if request.phase == "save_adapter":  # copies the stored adapter; no model is built
        digest = _write_adapter(context, inside_output_dir(settings, request.path))
        reply = Reply(info={"start": start, "end": time.time(), "sha256": digest})
    elif request.phase == "load_adapter":  # adopts an adapter saved in this node's folder; no model is built
        _read_adapter(context, inside_output_dir(settings, request.path), request.sha256)
        reply = Reply(info={"start": start, "end": time.time()})
    else:
        reply = run_phase(request, context, settings, start)
    return Message(encode_reply(reply), reply_to=message)


for _phase, _message_type in PHASE_MESSAGE_TYPES.items():  # one handler, routed by message type
    _category, _action = _message_type.split(".")
    getattr(app, _category)(_action)(handle)


def node_config(settings: NodeSettings, request: Request) -> RunConfig:
    """The run config the server sent, with this node's own data, evaluation set and model."""
    return apply_to_config(settings, run_config_from_text(request.config_text))


def check_tokenizer(settings: NodeSettings, config: RunConfig, expected: str) -> None:
    """Refuse to serve with a tokenizer other than the one the run aligns this client's knowledge with."""
    model = config.clients[settings.index].model
    found = tokenizer_fingerprint(load_tokenizer(model, config.cache_dir))
    if found != expected:
        raise FedMKTError(
            f"{settings.client}: this node's model {model.source} has a tokenizer (fingerprint {found[:12]}) other than the one "
            f"the run expects (fingerprint {expected[:12]}, from clients[{settings.index}].model of the run config). "
            "Fix: give this node the model the run names (--node-config model=...), or name this node's model in the run config."
        )


def run_phase(request: Request, context: Context, settings: NodeSettings, start: float) -> Reply:
    """Rebuild the client from this node's settings, restore its state, call the phase, store the new
    state; then run the phases the server asked to follow in this message (`request.then`) on the
    same party, each reported apart. `start` is when this message's handling began.

    Spans (this node's clock, for the round timeline) go into `info`: `start`/`end` for the phase,
    `then[PHASE]` = {stats?, error?, start, end} for each following phase.
    """
    if request.then and tuple(request.then) not in FOLLOW_UPS.get(request.phase, ()):
        raise FedMKTError(
            f"cannot run {', '.join(request.then)} after {request.phase} in one message. Fix: run the same fedmkt version on every machine."
        )
    config = node_config(settings, request)
    if settings.client in request.tokenizers:
        check_tokenizer(settings, config, request.tokenizers[settings.client])
    quiet_lightning()
    participant = build_participant(config, request.client)
    _restore_state(participant, context)

    reply = Reply()
    if request.phase == "fine_tune":
        reply.stats = asdict(participant.fine_tune(request.round))
    elif request.phase == "share_knowledge":
        reply.blobs["payload"] = participant.share_knowledge(request.round).to_bytes()
    elif request.phase == "distill":
        num_public = participant.num_public
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
    reply.info |= {"start": start, "end": time.time()}
    then = {}
    for phase in request.then:
        entry: dict = {"start": time.time()}
        try:
            if phase == "share_knowledge":
                reply.blobs["payload"] = participant.share_knowledge(request.round).to_bytes()
                _store_state(participant, context)
            elif phase == "evaluate":
                entry["stats"] = participant.evaluate()
            else:  # save_adapter: what the phase before stored
                entry["sha256"] = _write_adapter(context, inside_output_dir(settings, request.path))
        except Exception as error:  # reported as that phase's failure; the phase before stands
            entry["error"] = describe(error)
        entry["end"] = time.time()
        then[phase] = entry
    if then:
        reply.info["then"] = then
    return reply


def _restore_state(participant, context: Context) -> None:
    """Adapter and cached public losses left by this client's previous phase (none before its first)."""
    if STATE_KEY not in context.state.array_records:
        return
    record = context.state.array_records[STATE_KEY]
    participant.load_adapter_state(load_safetensors(array_bytes(record["adapter_model.safetensors"])))
    losses = record.get("public_losses")
    participant.restore_public_losses(load_safetensors(array_bytes(losses))["losses"] if losses is not None else None)


def _store_state(participant, context: Context) -> None:
    """Save the adapter exactly as `Participant.save_adapter` writes it, plus the cached losses."""
    record = ArrayRecord()
    with tempfile.TemporaryDirectory(prefix="fedmkt-adapter-") as tmp:
        participant.save_adapter(Path(tmp) / "adapter")
        for name in _ADAPTER_FILES:
            record[name] = bytes_array((Path(tmp) / "adapter" / name).read_bytes())
    losses = participant.cached_public_losses()
    if losses is not None:
        record["public_losses"] = bytes_array(save_safetensors({"losses": losses.contiguous()}))
    context.state[STATE_KEY] = record


def _write_adapter(context: Context, directory: Path) -> str:
    """Write the stored adapter's files into `directory`, each atomically (temporary file, then rename);
    returns the sha256 of its weights, which the server's checkpoint records.

    Nothing else is removed or replaced: other files in the folder stay as they are.
    """
    if STATE_KEY not in context.state.array_records:
        raise FedMKTError(
            "this client has no adapter yet (no phase ran on this SuperNode in this run). Fix: check the SuperNode's logs."
        )
    record = context.state.array_records[STATE_KEY]
    directory.mkdir(parents=True, exist_ok=True)
    for name in _ADAPTER_FILES:
        atomic_write_bytes(directory / name, array_bytes(record[name]))
    return hashlib.sha256(array_bytes(record[_ADAPTER_FILES[0]])).hexdigest()


def _read_adapter(context: Context, directory: Path, expected_sha256: str) -> None:
    """Make the adapter saved in `directory` this client's state (a resumed run, a rejoining node).

    The weights must hash to what the server's checkpoint recorded: an adapter of another round or
    run must not be continued silently. Cached public losses start empty and are recomputed.
    """
    files = {name: directory / name for name in _ADAPTER_FILES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FedMKTError(
            f"cannot restore this client: {', '.join(missing)} missing on this node. "
            "Fix: start this SuperNode with the output-dir it used in the interrupted run."
        )
    data = {name: path.read_bytes() for name, path in files.items()}
    found = hashlib.sha256(data[_ADAPTER_FILES[0]]).hexdigest()
    if expected_sha256 and found != expected_sha256:
        raise FedMKTError(
            f"the adapter in {directory} (sha256 {found[:12]}) is not the one the server's checkpoint recorded "
            f"({expected_sha256[:12]}). Fix: start this SuperNode with the output-dir of the run being resumed."
        )
    context.state[STATE_KEY] = ArrayRecord({name: bytes_array(blob) for name, blob in data.items()})
