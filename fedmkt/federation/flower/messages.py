"""A phase call and its answer as Flower records, and how a batch of them is sent.

A request names the phase, the client it is meant for, the round, and carries the resolved run
config (YAML text) so that a node can build its party from the request alone (its worker builds
it once and reuses it while requests of the same run come). Binary data (knowledge payloads,
adapter weights) travels as raw byte arrays in an `ArrayRecord`: Flower splits arrays into chunks
on the wire, and the bytes arrive exactly as sent (no pickles between machines; the receiver parses
them with safetensors). Phase statistics travel as JSON text, which keeps NaN task losses and
nested `teacher_counts` intact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedmkt.errors import FedMKTError

PHASE_MESSAGE_TYPES = {
    "hello": "query.hello",
    "fine_tune": "train.fine_tune",
    "share_knowledge": "query.share_knowledge",
    "distill": "train.distill",
    "evaluate": "evaluate.evaluate",
    "adapter_state": "query.adapter_state",
    "load_adapter_state": "train.load_adapter_state",
    "load_adapter": "train.load_adapter",
    "save_adapter": "query.save_adapter",
}
"""Phase → Flower message type (`<category>.<action>`; Flower routes on it in the ClientApp)."""

BYTES_STYPE = "fedmkt.bytes"
"""Serialisation tag of a byte-array `Array`: the data is the blob itself, not a NumPy file."""

_REQUEST, _REPLY, _BLOBS = "fedmkt.request", "fedmkt.reply", "fedmkt.blobs"


@dataclass
class Request:
    """One phase call for one client."""

    phase: str
    client: str
    config_text: str
    round: int = 0
    path: str = ""
    """For save_adapter/load_adapter: where, relative to this run's folder on the node."""
    run: str = ""
    """The name of the server's run folder: the node keeps each run's outputs in a folder of that name."""
    blobs: dict[str, bytes] = field(default_factory=dict)
    tokenizers: dict[str, str] = field(default_factory=dict)
    """Client name → the fingerprint of the tokenizer the run expects it to use (its node checks its own)."""
    then: list[str] = field(default_factory=list)
    """Phases to run right after this one on the same party (one message instead of several)."""
    fresh: bool = True
    """The server has no state of this client on this node yet (False: the node must hold one)."""
    sha256: str = ""
    """For load_adapter: the hash the server's checkpoint recorded for that adapter."""


@dataclass
class Reply:
    """What a phase returned: statistics and/or binary blobs."""

    stats: dict = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    """Small facts about the node (e.g. its partition id, answering `hello`)."""


def bytes_array(data: bytes) -> Array:
    """A blob as a Flower `Array` (uint8, one dimension), sent unchanged."""
    return Array(dtype="uint8", shape=(len(data),), stype=BYTES_STYPE, data=bytes(data))


def array_bytes(array: Array) -> bytes:
    """Inverse of `bytes_array`; refuses arrays that were not built by it."""
    if array.stype != BYTES_STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise FedMKTError(
            f"received a Flower array of type {array.stype}/{array.dtype}, expected raw bytes. Fix: run the same fedmkt version on every machine."
        )
    return array.data


def _blob_record(blobs: dict[str, bytes]) -> ArrayRecord:
    return ArrayRecord({name: bytes_array(data) for name, data in blobs.items()})


def _read_blobs(content: RecordDict) -> dict[str, bytes]:
    if _BLOBS not in content:
        return {}
    return {name: array_bytes(array) for name, array in content.array_records[_BLOBS].items()}


def encode_request(request: Request) -> RecordDict:
    """A `Request` as the content of a Flower Message."""
    if request.phase not in PHASE_MESSAGE_TYPES:
        raise ValueError(f"unknown phase {request.phase}")
    fields = {
        "phase": request.phase,
        "client": request.client,
        "config": request.config_text,
        "round": request.round,
        "path": request.path,
        "run": request.run,
        "tokenizers": json.dumps(request.tokenizers),
        "then": json.dumps(request.then),
        "fresh": request.fresh,
        "sha256": request.sha256,
    }
    return RecordDict({_REQUEST: ConfigRecord(fields), _BLOBS: _blob_record(request.blobs)})


def decode_request(content: RecordDict) -> Request:
    """Inverse of `encode_request`."""
    if _REQUEST not in content:
        raise FedMKTError(
            "received a Flower message without a fedmkt request. Fix: run the same fedmkt version on every machine."
        )
    fields = content.config_records[_REQUEST]
    return Request(
        phase=str(fields["phase"]),
        client=str(fields["client"]),
        config_text=str(fields["config"]),
        round=int(fields["round"]),
        path=str(fields["path"]),
        run=str(fields.get("run", "")),
        blobs=_read_blobs(content),
        tokenizers=json.loads(str(fields.get("tokenizers", "{}"))),
        then=json.loads(str(fields.get("then", "[]"))),
        fresh=bool(fields.get("fresh", True)),
        sha256=str(fields.get("sha256", "")),
    )


def encode_reply(reply: Reply) -> RecordDict:
    """A `Reply` as the content of a Flower Message."""
    fields = {"stats": json.dumps(reply.stats), "info": json.dumps(reply.info)}
    return RecordDict({_REPLY: ConfigRecord(fields), _BLOBS: _blob_record(reply.blobs)})


def decode_reply(content: RecordDict) -> Reply:
    """Inverse of `encode_reply`."""
    if _REPLY not in content:
        raise FedMKTError(
            "received a Flower reply without fedmkt results. Fix: run the same fedmkt version on every machine."
        )
    fields = content.config_records[_REPLY]
    return Reply(
        stats=json.loads(str(fields["stats"])), info=json.loads(str(fields["info"])), blobs=_read_blobs(content)
    )


REPLY_POLL_S = 0.2
"""How often a stage asks the SuperLink for replies (Flower's `send_and_receive` waits 3 s between asks)."""


def exchange(grid: Grid, messages: Sequence[Message], timeout_s: Optional[float]) -> list[Message]:
    """Push `messages` together and collect their replies as they arrive, until all came or
    `timeout_s` passed (None: no limit). What `Grid.send_and_receive` does, polling more often: its
    3 s pause between polls is a fixed cost on every stage of every round."""
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    replies: list[Message] = []
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(REPLY_POLL_S)
    return replies
