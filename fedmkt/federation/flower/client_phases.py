"""What a node does with one request: get its client's party, restore its state, run the phase(s).

The client's state between messages is a handful of byte blobs (the adapter exactly as
`Participant.save_adapter` writes it, and the cached public losses while valid); Flower keeps them
in `context.state` on the SuperNode, so a request can be answered by any process of the node: the
long-lived worker (`worker.py`), which keeps the built party in memory across messages, or the
ClientApp process itself. Phases reseed themselves, so a party restored from these blobs computes
exactly what a long-lived in-process party would.

This module imports torch and the models; the ClientApp process imports it only when it answers a
request itself (`keep-alive-s: 0`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.alignment.vocab_map import tokenizer_fingerprint
from fedmkt.config import RunConfig, run_config_from_text
from fedmkt.errors import FedMKTError, describe
from fedmkt.federation.flower.messages import Reply, Request
from fedmkt.federation.flower.node import NodeSettings, apply_to_config, inside_output_dir
from fedmkt.federation.participant import Participant
from fedmkt.federation.parties import build_participant, quiet_lightning
from fedmkt.files import atomic_write_bytes, atomic_write_text
from fedmkt.models import load_tokenizer
from fedmkt.payload import KnowledgePayload
from fedmkt.received import payload_byte_limit

ClientState = Optional[dict[str, bytes]]
"""The client's state on its node: blob name → bytes (None before its first stateful phase)."""

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LOSSES_BLOB, LOSSES_FILE, ROUND_FILE = "public_losses", "public_losses.safetensors", "node_state.json"
_READ_ONLY = {"evaluate", "adapter_state"}  # phases that change neither the adapter nor the cached losses

FOLLOW_UPS = {
    "fine_tune": (("share_knowledge",),),
    "distill": (("evaluate", "save_adapter"), ("save_adapter",)),
}
"""Phase → the sequences of phases that may follow it in the same message (see proxy.FlowerStages)."""


@dataclass
class _Cached:
    key: str
    participant: Participant
    state_digest: Optional[str]
    """Digest of the state blobs the party holds now (None: as built)."""


class PartyCache:
    """The node's built party, kept while requests come for the same run and client.

    Building a party (imports, model load, tokenised data, vocabulary maps) is most of a message's
    cost; a worker keeps it and restores state only when the blobs a request brings differ from
    what the party already holds. One party at a time: a request of another run replaces it.
    """

    def __init__(self) -> None:
        self._cached: Optional[_Cached] = None
        self.builds = 0

    def will_build(self, key: str, state: ClientState) -> bool:
        """Whether `party` builds a new party for this request (a first, another run, or a fresh start)."""
        cached = self._cached
        return cached is None or cached.key != key or (state is None and cached.state_digest is not None)

    def party(self, config: RunConfig, client: str, key: str, state: ClientState) -> Participant:
        cached = self._cached
        digest = state_digest(state)
        if self.will_build(key, state):
            self._cached = None  # frees the previous party before the next one loads
            quiet_lightning()
            cached = self._cached = _Cached(key, build_participant(config, client), None)
            self.builds += 1
        if digest != cached.state_digest:
            restore_state(cached.participant, state)
            cached.state_digest = digest
        return cached.participant

    def forget(self) -> None:
        """Drop the party: a phase failed part-way, so it may hold what no stored state describes."""
        self._cached = None

    def stored(self, state: ClientState) -> None:
        """The party's state is now `state` (after a stateful phase)."""
        if self._cached is not None:
            self._cached.state_digest = state_digest(state)


def state_digest(state: ClientState) -> Optional[str]:
    if state is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + hashlib.sha256(state[name]).digest())
    return digest.hexdigest()


def answer(
    request: Request, settings: NodeSettings, state: ClientState, node_id: int, cache: PartyCache, run_id: int = 0
) -> tuple[Reply, ClientState]:
    """Answer one request for this node's client; returns the reply and the client's new state."""
    if request.phase == "hello":  # no model is built; the tokenizer is checked when the run sends one
        if request.config_text and settings.client in request.tokenizers:
            check_tokenizer(settings, node_config(settings, request), request.tokenizers[settings.client])
        return Reply(info={"client": settings.client, "node_id": node_id}), state
    if request.client != settings.client:
        raise FedMKTError(
            f"a message for {request.client} reached the SuperNode of {settings.client}. Fix: give every SuperNode its own partition-id."
        )
    if not request.fresh and state is None and request.phase != "load_adapter":
        raise FedMKTError(
            f"this SuperNode holds no adapter of {settings.client} for this run, though the run trained one here "
            "(the SuperNode restarted?). Fix: the ServerApp restores it when the restarted node joins between rounds; "
            "otherwise resume the run (--resume RUN_DIR) with this node's output-dir unchanged."
        )
    start = time.time()
    if request.phase == "save_adapter":  # copies the stored state; no model is built
        digest = write_state(state, inside_output_dir(settings, request.run, request.path), request.round)
        return Reply(info={"start": start, "end": time.time(), "sha256": digest}), state
    if request.phase == "load_adapter":  # adopts a state saved in this node's folder; no model is built
        state = read_state(inside_output_dir(settings, request.run, request.path), request.sha256)
        return Reply(info={"start": start, "end": time.time()}), state
    try:
        reply, new_state = run_phase(request, settings, state, cache, start, run_id)
    except BaseException:
        cache.forget()
        raise
    if any("error" in entry for entry in reply.info.get("then", {}).values()):
        cache.forget()
    return reply, new_state


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


def run_phase(
    request: Request, settings: NodeSettings, state: ClientState, cache: PartyCache, start: float, run_id: int = 0
) -> tuple[Reply, ClientState]:
    """Get the client's party, call the phase, keep the new state; then run the phases the server
    asked to follow in this message (`request.then`) on the same party, each reported apart.
    `start` is when this message's handling began.

    Spans (this node's clock, for the round timeline) go into `info`: `start`/`end` for the phase,
    `then[PHASE]` = {stats?, error?, start, end} for each following phase.
    """
    if request.then and tuple(request.then) not in FOLLOW_UPS.get(request.phase, ()):
        raise FedMKTError(
            f"cannot run {', '.join(request.then)} after {request.phase} in one message. Fix: run the same fedmkt version on every machine."
        )
    config = node_config(settings, request)
    if request.phase in ("adapter_state", "load_adapter_state") and config.federation.mode != "fedavg":
        # weights leave or replace a node's for FedAvg alone (and only if it joined: `check_policy`)
        what = "sends" if request.phase == "adapter_state" else "takes in"
        raise FedMKTError(
            f"{settings.client}'s node {what} adapter weights only in a fedavg run, and this run is "
            f"{config.federation.mode}. Fix: run the same fedmkt version on the server."
        )
    key = hashlib.sha256(f"{run_id}\0{request.client}\0{request.config_text}\0{settings!r}".encode()).hexdigest()
    if settings.client in request.tokenizers and cache.will_build(key, state):  # before loading the model
        check_tokenizer(settings, config, request.tokenizers[settings.client])
    participant = cache.party(config, request.client, key, state)

    reply = Reply()
    if request.phase == "fine_tune":
        reply.stats = asdict(participant.fine_tune(request.round))
    elif request.phase == "share_knowledge":
        reply.blobs["payload"] = participant.share_knowledge(request.round).to_bytes()
    elif request.phase == "distill":
        num_public = participant.num_public
        limit = payload_byte_limit(num_public, participant.max_length, participant.transfer.top_k)
        teachers = {
            name.split("/", 1)[1]: KnowledgePayload.from_bytes(data, max_bytes=limit, num_public=num_public)
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
        state = capture_state(participant)
        cache.stored(state)
    reply.info |= {"start": start, "end": time.time()}
    then = {}
    for phase in request.then:
        entry: dict = {"start": time.time()}
        try:
            if phase == "share_knowledge":
                reply.blobs["payload"] = participant.share_knowledge(request.round).to_bytes()
                state = capture_state(participant)
                cache.stored(state)
            elif phase == "evaluate":
                entry["stats"] = participant.evaluate()
            else:  # save_adapter: what the phase before stored
                entry["sha256"] = write_state(
                    state, inside_output_dir(settings, request.run, request.path), request.round
                )
        except Exception as error:  # reported as that phase's failure; the phase before stands
            entry["error"] = describe(error)
        entry["end"] = time.time()
        then[phase] = entry
    if then:
        reply.info["then"] = then
    return reply, state


def restore_state(participant, state: ClientState) -> None:
    """Adapter and cached public losses of `state` into the party (nothing for a fresh party)."""
    if state is None:
        return
    participant.load_adapter_state(load_safetensors(state[ADAPTER_FILES[0]]))
    losses = state.get(LOSSES_BLOB)
    participant.restore_public_losses(load_safetensors(losses)["losses"] if losses is not None else None)


def capture_state(participant) -> dict[str, bytes]:
    """The adapter exactly as `Participant.save_adapter` writes it, plus the cached losses while valid."""
    with tempfile.TemporaryDirectory(prefix="fedmkt-adapter-") as tmp:
        participant.save_adapter(Path(tmp) / "adapter")
        state = {name: (Path(tmp) / "adapter" / name).read_bytes() for name in ADAPTER_FILES}
    losses = participant.cached_public_losses()
    if losses is not None:
        state[LOSSES_BLOB] = save_safetensors({"losses": losses.contiguous()})
    return state


def write_state(state: ClientState, directory: Path, round_index: int) -> str:
    """Write the client's adapter, its cached public losses and the round into `directory`, each
    atomically (temporary file, then rename), the round record last; returns the sha256 of the
    adapter weights, which the server's checkpoint records.

    Nothing else is removed or replaced: other files in the folder stay as they are.
    """
    if state is None:
        raise FedMKTError(
            "this client has no adapter yet (no phase ran on this SuperNode in this run). Fix: check the SuperNode's logs."
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        atomic_write_bytes(directory / name, state[name])
    if LOSSES_BLOB in state:
        atomic_write_bytes(directory / LOSSES_FILE, state[LOSSES_BLOB])
    elif (directory / LOSSES_FILE).is_file():  # stale losses of an earlier write: no longer this adapter's
        (directory / LOSSES_FILE).unlink()
    digest = hashlib.sha256(state[ADAPTER_FILES[0]]).hexdigest()
    record = {"round": round_index, "adapter_sha256": digest, "public_losses": LOSSES_BLOB in state}
    atomic_write_text(directory / ROUND_FILE, json.dumps(record))
    return digest


def read_state(directory: Path, expected_sha256: str) -> dict[str, bytes]:
    """The client state saved in `directory` (a resumed run, a rejoining node).

    The weights must hash to what the server's checkpoint recorded: an adapter of another round or
    run must not be continued silently. The cached public losses come back when the node saved them
    with this very adapter; otherwise they start empty and are recomputed.
    """
    files = {name: directory / name for name in ADAPTER_FILES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FedMKTError(
            f"cannot restore this client: {', '.join(missing)} missing on this node. "
            "Fix: start this SuperNode with the output-dir it used in the interrupted run."
        )
    state = {name: path.read_bytes() for name, path in files.items()}
    if not expected_sha256:  # an empty hash would skip the one check that ties the weights to the run
        raise FedMKTError(
            f"a request to restore the adapter in {directory} names no sha256 to check it against. "
            "Fix: run the same fedmkt version on the server (its checkpoint records each adapter's hash)."
        )
    found = hashlib.sha256(state[ADAPTER_FILES[0]]).hexdigest()
    if found != expected_sha256:
        raise FedMKTError(
            f"the adapter in {directory} (sha256 {found[:12]}) is not the one the server's checkpoint recorded "
            f"({expected_sha256[:12]}). Fix: start this SuperNode with the output-dir of the run being resumed."
        )
    record = _round_record(directory / ROUND_FILE)
    if record.get("adapter_sha256") == found and record.get("public_losses") and (directory / LOSSES_FILE).is_file():
        state[LOSSES_BLOB] = (directory / LOSSES_FILE).read_bytes()
    return state


def _round_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: the losses are recomputed
        return {}
    return record if isinstance(record, dict) else {}
