"""The Flower deployment backend (`federation.backend: flower`).

Fast tests cover the message encoding, the server-side client proxy talking to an in-memory
grid, the ClientApp's node state and the one-line errors. The end-to-end test starts a real
SuperLink and two SuperNodes (partition-id 0 and 1) on 127.0.0.1 in insecure mode, runs tiny.yaml
through them and checks that the summary and every saved adapter match an in-process run with
the same seed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedmkt.cli import main  # noqa: E402
from fedmkt.config import parse_run_config, run_config_from_text, shipped_configs  # noqa: E402
from fedmkt.errors import FedMKTError  # noqa: E402
from fedmkt.federation.flower import client_app, client_phases, submit  # noqa: E402
from fedmkt.federation.flower.messages import (  # noqa: E402
    PHASE_MESSAGE_TYPES,
    Reply,
    Request,
    array_bytes,
    bytes_array,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from fedmkt.federation.flower.node import POLICY_KEYS, node_settings  # noqa: E402
from fedmkt.federation.flower.proxy import RemoteParticipant, RemoteParticipantError, run_together  # noqa: E402
from fedmkt.federation.flower.server_app import find_client_nodes  # noqa: E402
from fedmkt.federation.protocol import PhaseStats  # noqa: E402
from fedmkt.payload import KnowledgePayload  # noqa: E402

TINY_TEXT = shipped_configs()["tiny.yaml"].read_text()


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a Flower process need a run/node/task identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """An in-memory Grid: `nodes[node_id](message, context)` answers at once (None: never answers).

    As in Flower, an exception in the node's handler comes back as an error reply.
    """

    def __init__(self, nodes: dict, node_configs: dict | None = None) -> None:
        self.nodes = nodes
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"keep-alive-s": 0, **(node_configs or {}).get(node_id, {})},  # no worker process
                state=RecordDict(),
                run_config={},
            )
            for node_id in nodes
        }
        self.sent: list[Message] = []
        self.batches: list[list[str]] = []  # the message types of each push
        self.waiting: dict[str, Message] = {}  # replies not pulled yet, by the message they answer
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Each node answers at once; its reply waits on the SuperLink until pulled."""
        ids = []
        self.batches.append([m.metadata.message_type for m in messages])
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Grid.push_messages does
            self.sent.append(message)
            try:
                reply = self.nodes[message.metadata.dst_node_id](message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:
                reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            if reply is not None:
                self.waiting[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self.waiting.pop(message_id) for message_id in list(message_ids) if message_id in self.waiting]


def _payload(sender: str = "client_0", vocab_size: int = 100, num_samples: int = 3) -> KnowledgePayload:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4, 2, 5][:num_samples])
    rows = int(lengths.sum())
    return KnowledgePayload(
        sender=sender,
        round=1,
        vocab_size=vocab_size,
        sample_index=torch.arange(num_samples),
        losses=torch.rand(num_samples, generator=generator),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        token_ids=torch.randint(0, vocab_size, (rows,), generator=generator, dtype=torch.int16),
        topk_ids=torch.randint(0, vocab_size, (rows, 4), generator=generator, dtype=torch.int16),
        topk_logits=torch.randn(rows, 4, generator=generator).half(),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
    )


def _same_payload(a: KnowledgePayload, b: KnowledgePayload) -> bool:
    """Equal content (safetensors bytes are not: the header's metadata order varies between calls)."""
    fields = ("sample_index", "losses", "offsets", "token_ids", "topk_ids", "topk_logits")
    return (a.sender, a.round, a.vocab_size) == (b.sender, b.round, b.vocab_size) and all(
        getattr(a, f).dtype == getattr(b, f).dtype and torch.equal(getattr(a, f), getattr(b, f)) for f in fields
    )


def _proxy(grid: FakeGrid, tmp_path: Path, node_id: int = 7, timeout_s=None) -> RemoteParticipant:
    return RemoteParticipant("client_0", node_id, grid, TINY_TEXT, tmp_path / "run", num_public=3, timeout_s=timeout_s)


# ---- message encoding ----------------------------------------------------------------------


def test_requests_and_replies_round_trip_bytes_and_nan_statistics():
    blob = bytes(range(256)) * 3
    request = Request(
        phase="distill",
        client="client_1",
        config_text=TINY_TEXT,
        round=2,
        path="adapters/x",
        blobs={"payload/server": blob},
    )
    decoded = decode_request(encode_request(request))
    assert decoded == request
    stats = {"task_loss": float("nan"), "kd_loss": 0.25, "selected": 3, "teacher_counts": {"server": 3}}
    reply = decode_reply(encode_reply(Reply(stats=stats, blobs={"adapter": b""}, info={"client": "client_1"})))
    assert math.isnan(reply.stats["task_loss"])
    assert {k: v for k, v in reply.stats.items() if k != "task_loss"} == {
        k: v for k, v in stats.items() if k != "task_loss"
    }
    assert reply.blobs == {"adapter": b""} and reply.info == {"client": "client_1"}


def test_byte_arrays_refuse_foreign_arrays():
    import numpy as np
    from flwr.app import Array

    assert array_bytes(bytes_array(b"\x00abc")) == b"\x00abc"
    with pytest.raises(FedMKTError, match="raw bytes"):
        array_bytes(Array(np.zeros(3, dtype=np.uint8)))


def test_every_phase_routes_to_a_registered_client_app_handler():
    assert set(client_app.app._registered_funcs) == set(PHASE_MESSAGE_TYPES.values())


def test_partition_id_names_the_client():
    assert node_settings({"partition-id": 1}).client == "client_1"
    assert node_settings({"partition-id": "0"}, num_clients=2).client == "client_0"
    for bad in ({}, {"partition-id": "x"}, {"partition-id": -1}, {"partition-id": 0, "data-path": "x.jsonl"}):
        with pytest.raises(FedMKTError, match="Fix:"):
            node_settings(bad)
    with pytest.raises(FedMKTError, match="partition-id 2"):
        node_settings({"partition-id": 2}, num_clients=2)


# ---- the proxy, against an in-memory grid ----------------------------------------------------


def test_proxy_forwards_phases_and_returns_their_results(task_identity, tmp_path):
    payload = _payload()

    def node(message: Message, context: Context) -> Message:
        request = decode_request(message.content)
        assert request.client == "client_0" and request.config_text == TINY_TEXT
        if request.phase == "share_knowledge":
            return Message(encode_reply(Reply(blobs={"payload": payload.to_bytes()})), reply_to=message)
        if request.phase == "distill":
            assert set(request.blobs) == {"payload/server"}
            assert _same_payload(KnowledgePayload.from_bytes(request.blobs["payload/server"]), server_payload)
        if request.phase in ("fine_tune", "distill"):  # a phase's stats travel as the fields of PhaseStats
            stats = asdict(PhaseStats(task_loss=float(request.round), selected=len(request.blobs), ranks=1))
        else:
            stats = {"phase": request.phase, "round": request.round, "path": request.path}
        return Message(encode_reply(Reply(stats=stats)), reply_to=message)

    server_payload = _payload("server", vocab_size=300)
    grid = FakeGrid({7: node})
    proxy = _proxy(grid, tmp_path)
    assert proxy.fine_tune(3) == PhaseStats(task_loss=3.0, ranks=1)
    shared = proxy.share_knowledge(3)
    assert _same_payload(shared, payload)
    assert proxy.distill(3, {"server": server_payload}) == PhaseStats(task_loss=3.0, selected=1, ranks=1)
    assert proxy.evaluate()["phase"] == "evaluate"
    proxy.save_adapter(tmp_path / "run" / "adapters" / "round_3" / "client_0")
    assert (
        decode_request(grid.sent[-1].content).path == "adapters/round_3/client_0"
    )  # relative: the node has its own folder
    assert [m.metadata.message_type for m in grid.sent] == [
        "train.fine_tune",
        "query.share_knowledge",
        "train.distill",
        "evaluate.evaluate",
        "query.save_adapter",
    ]
    assert {m.metadata.dst_node_id for m in grid.sent} == {7}
    assert proxy.cached_public_losses() is None  # client losses never reach the server


def test_proxy_validates_payloads_at_the_network_boundary(task_identity, tmp_path):
    bad = _payload()
    bad.topk_ids[0, 0] = 100  # outside the sender's vocabulary of 100
    forged = _payload(sender="client_1")
    answers = iter([bad, forged])

    def node(message, context):
        return Message(encode_reply(Reply(blobs={"payload": next(answers).to_bytes()})), reply_to=message)

    proxy = _proxy(FakeGrid({7: node}), tmp_path)
    with pytest.raises(FedMKTError, match="vocabulary"):
        proxy.share_knowledge(1)
    with pytest.raises(FedMKTError, match="signed by client_1"):
        proxy.share_knowledge(1)


def test_proxy_turns_node_errors_and_silence_into_client_failures(task_identity, tmp_path):
    def failing(message, context):
        return Message(Error(code=3, reason="FedMKTError: out of memory"), reply_to=message)

    with pytest.raises(RemoteParticipantError, match="fine_tune failed on SuperNode 7.*out of memory"):
        _proxy(FakeGrid({7: failing}), tmp_path).fine_tune(1)
    with pytest.raises(RemoteParticipantError, match="no reply to evaluate"):
        _proxy(FakeGrid({7: lambda message, context: None}), tmp_path, timeout_s=0.1).evaluate()


def test_proxy_moves_adapters_only_when_asked_and_restores_only_checkpointed_ones(task_identity, tmp_path):
    state = {"a.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    received = {}

    def node(message, context):
        request = decode_request(message.content)
        from safetensors.torch import load, save

        if request.phase == "load_adapter_state":
            received.update(load(request.blobs["adapter"]))
            return Message(encode_reply(Reply()), reply_to=message)
        return Message(encode_reply(Reply(blobs={"adapter": save(state)})), reply_to=message)

    proxy = _proxy(FakeGrid({7: node}), tmp_path)
    assert all(torch.equal(proxy.adapter_state()[k], v) for k, v in state.items())
    proxy.load_adapter_state(state)
    assert all(torch.equal(received[k], v) for k, v in state.items())
    with pytest.raises(FedMKTError, match="no round checkpoint|Fix:"):  # run_dir has no checkpoint to resume
        proxy.load_adapter(tmp_path / "run" / "adapters" / "round_1" / "client_0")


# ---- the ClientApp's node state -------------------------------------------------------------


class _FakeParticipant:
    """What `capture_state` / `restore_state` use of a Participant."""

    def __init__(self, losses=None):
        self.losses = losses
        self.loaded = None

    weights = {"layer.lora_A.weight": torch.arange(6.0).reshape(2, 3)}

    def save_adapter(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True)
        save_file(self.weights, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text('{"r": 8}')

    def cached_public_losses(self):
        return self.losses

    def load_adapter_state(self, state):
        self.loaded = state

    def restore_public_losses(self, losses):
        self.losses = losses


def test_client_state_persists_in_the_node_context_and_save_adapter_writes_it(task_identity, tmp_path):
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "output-dir": str(tmp_path / "node"), "keep-alive-s": 0},
        state=RecordDict(),
        run_config={},
    )
    restored = _FakeParticipant()
    client_phases.restore_state(restored, client_app.read_state(context))  # before the first phase: a fresh party
    assert restored.loaded is None and restored.losses is None

    client_app.write_state(context, client_phases.capture_state(_FakeParticipant(torch.tensor([0.5, 1.5]))))
    assert set(context.state.array_records[client_app.STATE_KEY]) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "public_losses",
    }
    client_phases.restore_state(restored, client_app.read_state(context))
    assert torch.equal(restored.loaded["layer.lora_A.weight"], _FakeParticipant.weights["layer.lora_A.weight"])
    assert torch.equal(restored.losses, torch.tensor([0.5, 1.5]))

    request = Message(
        encode_request(
            Request(
                phase="save_adapter",
                client="client_0",
                config_text=TINY_TEXT,
                path="adapters/round_1/client_0",
                run="demo",
                round=1,
            )
        ),
        dst_node_id=7,
        message_type="query.save_adapter",
    )
    reply = client_app.handle(request, context)
    assert not reply.has_error()
    folder = tmp_path / "node" / "runs" / "demo" / "adapters" / "round_1" / "client_0"  # the run's own folder
    assert torch.equal(
        load_file(folder / "adapter_model.safetensors")["layer.lora_A.weight"],
        _FakeParticipant.weights["layer.lora_A.weight"],
    )
    assert json.loads((folder / "adapter_config.json").read_text()) == {"r": 8}
    # The cached losses and the round are saved with the adapter, and come back with it.
    assert torch.equal(load_file(folder / "public_losses.safetensors")["losses"], torch.tensor([0.5, 1.5]))
    record = json.loads((folder / "node_state.json").read_text())
    assert record["round"] == 1 and record["adapter_sha256"] == decode_reply(reply.content).info["sha256"]
    back = client_phases.read_state(folder, record["adapter_sha256"])
    assert back == client_app.read_state(context)

    client_app.write_state(context, client_phases.capture_state(_FakeParticipant(None)))  # losses no longer valid
    client_phases.restore_state(restored, client_app.read_state(context))
    assert restored.losses is None
    client_app.handle(request, context)  # the same folder again: the stale losses file goes
    assert not (folder / "public_losses.safetensors").exists()
    fresh = json.loads((folder / "node_state.json").read_text())["adapter_sha256"]
    assert client_phases.LOSSES_BLOB not in client_phases.read_state(folder, fresh)
    with pytest.raises(FedMKTError, match="names no sha256"):  # an empty hash once skipped the check
        client_phases.read_state(folder, "")


def test_client_app_answers_hello_and_refuses_messages_for_another_client(task_identity):
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 1, "keep-alive-s": 0}, state=RecordDict(), run_config={}
    )
    hello = Message(
        encode_request(Request(phase="hello", client="", config_text="")), dst_node_id=7, message_type="query.hello"
    )
    assert decode_reply(client_app.handle(hello, context).content).info["client"] == "client_1"
    wrong = Message(
        encode_request(Request(phase="evaluate", client="client_0", config_text=TINY_TEXT)),
        dst_node_id=7,
        message_type="evaluate.evaluate",
    )
    with pytest.raises(FedMKTError, match="reached the SuperNode of client_1"):
        client_app.handle(wrong, context)


def test_the_server_maps_partition_ids_to_nodes_and_names_what_is_missing(task_identity):
    config = run_config_from_text(TINY_TEXT)
    config.flower.wait_for_nodes_s = 0.5
    grid = FakeGrid({11: client_app.handle, 12: client_app.handle}, {11: {"partition-id": 1}, 12: {"partition-id": 0}})
    assert find_client_nodes(grid, config) == {"client_0": 12, "client_1": 11}

    one = FakeGrid({11: client_app.handle}, {11: {"partition-id": 1}})
    with pytest.raises(FedMKTError, match="1 of the 2 SuperNodes.*partition-id=N"):
        find_client_nodes(one, config)
    twins = FakeGrid({11: client_app.handle, 12: client_app.handle}, {11: {"partition-id": 1}, 12: {"partition-id": 1}})
    with pytest.raises(FedMKTError, match="client_0"):
        find_client_nodes(twins, config)
    unnamed = FakeGrid({11: client_app.handle, 12: client_app.handle}, {11: {"partition-id": 1}, 12: {}})
    with pytest.raises(FedMKTError, match="no SuperNode answered for client_0.*no partition-id"):
        find_client_nodes(unnamed, config)
    spare = FakeGrid(
        {11: client_app.handle, 12: client_app.handle, 13: client_app.handle},
        {11: {"partition-id": 1}, 12: {"partition-id": 0}, 13: {"partition-id": 5}},
    )
    assert find_client_nodes(spare, config) == {
        "client_0": 12,
        "client_1": 11,
    }  # a node for no client of this run is ignored


# ---- one real client phase through the message layer ---------------------------------------


def test_a_client_phase_through_messages_matches_the_in_process_participant(task_identity, tmp_path):
    """build_participant gives the same party as build_participants, and share_knowledge through
    proxy → messages → ClientApp (rebuilt party) returns the same payload."""
    from fedmkt.federation.parties import build_participant, build_participants

    text = TINY_TEXT.replace("pool_size: 24", "pool_size: 6").replace("max_length: 96", "max_length: 48")
    config = run_config_from_text(text)
    _, clients = build_participants(config)
    alone = build_participant(config, "client_1")
    reference = clients[1].adapter_state()
    assert reference.keys() == alone.adapter_state().keys()
    assert all(torch.equal(reference[k], alone.adapter_state()[k]) for k in reference)

    reference_payload = clients[1].share_knowledge(1)
    grid = FakeGrid({3: client_app.handle}, {3: {"partition-id": 1}})
    proxy = RemoteParticipant("client_1", 3, grid, text, tmp_path, num_public=len(clients[1].data.public))
    assert _same_payload(proxy.share_knowledge(1), reference_payload)
    assert client_app.STATE_KEY in grid.contexts[3].state.array_records  # losses + adapter kept on the node


def _worker_job(phase, settings, state, supernode, round_index=1):
    from fedmkt.federation.flower.worker import Job

    text = TINY_TEXT.replace("pool_size: 24", "pool_size: 6").replace("max_length: 96", "max_length: 48")
    request = Request(phase=phase, client="client_1", config_text=text, round=round_index, fresh=state is None)
    return Job(request, settings, state, node_id=3, run_id=1, launcher_pid=supernode.pid, caller_pid=os.getpid())


def _same_state(a: dict, b: dict) -> bool:
    from safetensors.torch import load

    def config(blob: bytes) -> dict:  # PEFT writes target_modules from a set: its order varies
        values = json.loads(blob)
        return values | {"target_modules": sorted(values["target_modules"])}

    tensors = [name for name in a if name.endswith(".safetensors") or name == client_phases.LOSSES_BLOB]
    same = set(a) == set(b) and config(a["adapter_config.json"]) == config(b["adapter_config.json"])
    for name in tensors:
        x, y = load(a[name]), load(b[name])
        same = same and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return same


def _scores(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if not key.endswith("seconds")}


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    from fedmkt.federation.flower.worker import _alive

    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.slow
def test_the_node_worker_keeps_the_party_between_messages_and_leaves_with_its_supernode(task_identity, tmp_path):
    """Two messages reuse one worker (one party build) and answer as the ClientApp process itself
    does; the worker leaves when its SuperNode dies, when it sat idle for keep-alive-s, and when
    another SuperNode takes over its folder."""
    from fedmkt.federation.flower import worker

    settings = node_settings({"partition-id": 1, "output-dir": str(tmp_path / "node"), "keep-alive-s": 3})
    folder = worker.worker_folder(settings)
    supernode = subprocess.Popen(["sleep", "600"])  # stands in for the SuperNode process
    try:
        shared, state = worker.call(_worker_job("share_knowledge", settings, None, supernode))
        first = json.loads((folder / "address.json").read_text())["pid"]
        evaluated, same_state = worker.call(_worker_job("evaluate", settings, state, supernode))
        assert json.loads((folder / "address.json").read_text())["pid"] == first
        assert same_state == state  # evaluating changes no state
        assert (folder / "key").stat().st_mode & 0o077 == 0  # the key is the node user's only
        log = (folder / "worker.log").read_text()
        assert "share_knowledge round 1: ok" in log and "evaluate round 1: ok in" in log
        assert "party builds so far: 1)" in log.splitlines()[-1]  # the second message reused the party

        # The same two phases answered in this process, each on a party built afresh.
        cache = client_phases.PartyCache()
        job = _worker_job("share_knowledge", settings, None, supernode)
        local, local_state = client_phases.answer(job.request, settings, None, 3, cache, 1)
        assert _same_payload(
            KnowledgePayload.from_bytes(shared.blobs["payload"]), KnowledgePayload.from_bytes(local.blobs["payload"])
        )
        assert _same_state(local_state, state)
        fresh = client_phases.PartyCache()
        local_eval, _ = client_phases.answer(
            _worker_job("evaluate", settings, state, supernode).request, settings, state, 3, fresh, 1
        )
        assert _scores(local_eval.stats) == _scores(evaluated.stats)

        supernode.kill()
        supernode.wait()
        assert _gone(first)  # its SuperNode is gone: so is the worker
        assert not (folder / "address.json").exists()

        supernode = subprocess.Popen(["sleep", "600"])
        again, _ = worker.call(_worker_job("evaluate", settings, state, supernode))  # a new worker, rebuilt from state
        second = json.loads((folder / "address.json").read_text())["pid"]
        assert second != first and _scores(again.stats) == _scores(evaluated.stats)
        other = subprocess.Popen(["sleep", "600"])  # a restarted SuperNode on the same folder
        try:
            worker.call(_worker_job("evaluate", settings, state, other))
            third = json.loads((folder / "address.json").read_text())["pid"]
            assert third not in (first, second) and _gone(second)
            assert _gone(third, timeout_s=30.0)  # idle for keep-alive-s (3 s): it leaves by itself
        finally:
            other.kill()
    finally:
        supernode.kill()


def test_a_party_whose_phase_failed_part_way_is_built_again(task_identity, monkeypatch):
    """A phase that raised may have changed the party (half an epoch of training) without a state
    that describes it; the cache must not hand that party to the next request."""
    built = []

    class HalfTrained(_FakeParticipant):
        def fine_tune(self, round_index):
            raise RuntimeError("out of memory in step 3")

        def evaluate(self):
            return {"eval_accuracy": 0.5}

    monkeypatch.setattr(
        client_phases, "build_participant", lambda config, client: built.append(client) or HalfTrained()
    )
    settings = node_settings({"partition-id": 0, "keep-alive-s": 0})
    cache = client_phases.PartyCache()
    evaluate = Request(phase="evaluate", client="client_0", config_text=TINY_TEXT)
    client_phases.answer(evaluate, settings, None, 7, cache)
    client_phases.answer(evaluate, settings, None, 7, cache)
    assert cache.builds == 1  # read-only phases reuse the party
    with pytest.raises(RuntimeError, match="out of memory"):
        client_phases.answer(
            Request(phase="fine_tune", client="client_0", config_text=TINY_TEXT), settings, None, 7, cache
        )
    client_phases.answer(evaluate, settings, None, 7, cache)
    assert cache.builds == 2 and built == ["client_0", "client_0"]


def test_keep_alive_is_a_number_of_seconds():
    assert node_settings({"partition-id": 0}).keep_alive_s == 1800.0
    assert node_settings({"partition-id": 0, "keep-alive-s": "0"}).keep_alive_s == 0.0
    for bad in ("soon", -1, "nan"):
        with pytest.raises(FedMKTError, match="keep-alive-s .* Fix: use e.g. keep-alive-s=1800"):
            node_settings({"partition-id": 0, "keep-alive-s": bad})


# ---- all clients at once ---------------------------------------------------------------------


def test_a_stage_goes_to_every_client_in_one_batch_and_failures_stay_per_client(task_identity, tmp_path):
    def node(message, context):
        request = decode_request(message.content)
        if request.client == "client_1":
            raise RuntimeError("CUDA out of memory")
        return Message(
            encode_reply(Reply(stats={"task_loss": 0.5}, info={"start": 10.0, "end": 12.5})), reply_to=message
        )

    def unavailable(message, context):  # what the SuperLink answers for a node that stopped heartbeating
        reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = 0  # from the SuperLink itself, not from node 10
        return reply

    grid = FakeGrid({7: node, 8: node, 9: lambda message, context: None, 10: unavailable})
    clients = [
        RemoteParticipant(f"client_{i}", 7 + i, grid, TINY_TEXT, tmp_path, num_public=3, timeout_s=0.1)
        for i in range(4)
    ]
    before = time.time()
    outcomes = run_together("fine_tune", [(client, (2,)) for client in clients])
    assert grid.batches == [["train.fine_tune"] * 4]  # one push carrying every client's message
    assert grid.pulls >= 2  # replies collected as they came, until the wait for the silent node ended
    assert [decode_request(m.content).round for m in grid.sent] == [2, 2, 2, 2]
    assert outcomes["client_0"].value == PhaseStats(task_loss=0.5) and outcomes["client_0"].error is None
    span = outcomes["client_0"].span("fine_tune")
    assert {key: span[key] for key in ("phase", "start", "end")} == {
        "phase": "fine_tune",
        "start": 10.0,
        "end": 12.5,
    }  # the node's clock
    assert before <= span["sent"] <= time.time()  # when the server sent the message (for its latency)
    assert isinstance(outcomes["client_1"].error, RemoteParticipantError) and "out of memory" in str(
        outcomes["client_1"].error
    )
    assert "no reply to fine_tune" in str(outcomes["client_2"].error)
    assert "fine_tune failed on SuperNode 10 (error 5): Error: Node Unavailable" in str(outcomes["client_3"].error)
    assert all(m.metadata.ttl == pytest.approx(0.1 + 60.0) for m in grid.sent)  # the SuperLink drops them after that


@pytest.mark.slow
def test_a_round_over_flower_messages_matches_in_process_with_two_messages_per_client(task_identity, tmp_path):
    """The trainer over RemoteParticipants and the real ClientApp (FakeGrid) gives the in-process
    round; fine-tune + share and distill + evaluate + save each travel as one message."""
    from fedmkt.federation.flower.proxy import FlowerStages
    from fedmkt.federation.parties import build_participant, build_participants
    from fedmkt.federation.trainer import FederatedTrainer

    text = (
        TINY_TEXT.replace("pool_size: 24", "pool_size: 6")
        .replace("eval_size: 12", "eval_size: 4")
        .replace("max_length: 96", "max_length: 48")
        .replace("rounds: 2", "rounds: 1")
        .replace("evaluate_before: true", "evaluate_before: false")
    )
    config = run_config_from_text(text)
    server, clients = build_participants(config)
    expected = FederatedTrainer(server, clients, config, tmp_path / "inprocess").fit()

    config = run_config_from_text(text)
    grid = FakeGrid(
        {3: client_app.handle, 4: client_app.handle},
        {
            3: {"partition-id": 0, "output-dir": str(tmp_path / "node_0")},
            4: {"partition-id": 1, "output-dir": str(tmp_path / "node_1")},
        },
    )
    server = build_participant(config, "server")
    run_dir = tmp_path / "flower"
    remote = [
        RemoteParticipant(f"client_{i}", 3 + i, grid, text, run_dir, num_public=len(server.data.public), timeout_s=600)
        for i in range(2)
    ]
    got = FederatedTrainer(server, remote, config, run_dir, run_clients=FlowerStages(config, run_dir)).fit()

    assert grid.batches == [["train.fine_tune"] * 2, ["train.distill"] * 2]  # two batches, one message per client each
    assert [decode_request(m.content).then for m in grid.sent] == [["share_knowledge"]] * 2 + [
        ["evaluate", "save_adapter"]
    ] * 2
    ours, theirs = got["rounds"][0]["parties"], expected["rounds"][0]["parties"]
    for party, entry in theirs.items():
        assert [s["phase"] for s in ours[party]["timeline"]] == [s["phase"] for s in entry["timeline"]], party
        for key in (
            "task_loss",
            "kd_loss",
            "selected",
            "teacher_counts",
            "bytes_sent",
            "bytes_received",
            "eval_accuracy",
        ):
            assert ours[party][key] == pytest.approx(entry[key], abs=1e-5), (party, key)
    for index in range(2):  # each node wrote its adapter into the run's folder of its own, as in-process
        node = load_file(
            tmp_path
            / f"node_{index}"
            / "runs"
            / run_dir.name
            / "adapters"
            / "round_1"
            / f"client_{index}"
            / "adapter_model.safetensors"
        )
        local = load_file(
            tmp_path / "inprocess" / "adapters" / "round_1" / f"client_{index}" / "adapter_model.safetensors"
        )
        assert node.keys() == local.keys() and all(torch.allclose(node[k], local[k], atol=1e-6) for k in local)


# ---- state that survives restarts ----------------------------------------------------------------

SMALL_TEXT = (
    TINY_TEXT.replace("pool_size: 24", "pool_size: 6")
    .replace("eval_size: 12", "eval_size: 4")
    .replace("max_length: 96", "max_length: 48")
    .replace("evaluate_before: true", "evaluate_before: false")
)


class Killed(BaseException):
    """Stands in for a SIGKILL of the ServerApp: not an Exception, so nothing may swallow it."""


@pytest.fixture(scope="module")
def small_in_process(tmp_path_factory):
    """The uninterrupted 2-round in-process run every restart must end at."""
    from fedmkt.federation.parties import build_participants
    from fedmkt.federation.trainer import FederatedTrainer

    config = run_config_from_text(SMALL_TEXT)
    server, clients = build_participants(config)
    return FederatedTrainer(server, clients, config, tmp_path_factory.mktemp("small")).fit()


def _small_flower(tmp_path: Path) -> str:
    return SMALL_TEXT.replace("run_dir: runs/tiny", f"run_dir: {tmp_path / 'server'}")


def _node_grid(tmp_path: Path, node_ids=(3, 4)) -> FakeGrid:
    configs = {nid: {"partition-id": i, "output-dir": str(tmp_path / f"node_{i}")} for i, nid in enumerate(node_ids)}
    return FakeGrid({nid: client_app.handle for nid in node_ids}, configs)


def _same_rounds(got: dict, expected: dict) -> None:
    assert len(got["rounds"]) == len(expected["rounds"]) == 2
    for ours, theirs in zip(got["rounds"], expected["rounds"]):
        assert ours["failed"] == theirs["failed"] == {}
        for party, entry in theirs["parties"].items():
            assert (ours["parties"][party]["selected"], ours["parties"][party]["teacher_counts"]) == (
                entry["selected"],
                entry["teacher_counts"],
            ), party
            for key in ("task_loss", "distill_task_loss", "kd_loss", "eval_accuracy"):
                if key in entry:
                    assert ours["parties"][party][key] == pytest.approx(entry[key], abs=1e-4), (
                        ours["round"],
                        party,
                        key,
                    )


@pytest.mark.slow
def test_the_server_app_killed_after_round_1_resumes_to_the_uninterrupted_run(
    task_identity, tmp_path, monkeypatch, small_in_process
):
    """The ServerApp dies in round 2; SuperLink and SuperNodes restart too (new node ids, empty node
    state). `serve(resume=True)` continues from the checkpoint, each node from its own folder."""
    from fedmkt.federation.flower.server_app import serve
    from fedmkt.federation.participant import Participant

    text = _small_flower(tmp_path)
    original = Participant.distill

    def distill_then_die(self, round_index, payloads):
        if round_index == 2 and self.name == "server":
            raise Killed()
        return original(self, round_index, payloads)

    monkeypatch.setattr(Participant, "distill", distill_then_die)
    with pytest.raises(Killed):
        serve(_node_grid(tmp_path), text)
    checkpoint = json.loads((tmp_path / "server" / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["round"] == 1 and set(checkpoint["adapter_sha256"]) == {"client_0", "client_1"}
    monkeypatch.setattr(Participant, "distill", original)

    grid = _node_grid(tmp_path, node_ids=(13, 14))
    _same_rounds(serve(grid, text, resume=True), small_in_process)
    restores = [decode_request(m.content) for m in grid.sent if m.metadata.message_type == "train.load_adapter"]
    assert sorted((r.client, r.path) for r in restores) == [
        ("client_0", "adapters/round_1/client_0"),
        ("client_1", "adapters/round_1/client_1"),
    ]
    assert all(r.sha256 == checkpoint["adapter_sha256"][r.client] for r in restores)


@pytest.mark.slow
def test_a_supernode_restarted_between_rounds_rejoins_from_its_own_folder(
    task_identity, tmp_path, monkeypatch, small_in_process
):
    """client_0's SuperNode restarts after round 1 with the same partition-id and a new node id; the
    ServerApp finds it again and it continues from its round-1 adapter, not from its initial one."""
    from fedmkt.federation.flower.server_app import serve
    from fedmkt.federation.trainer import FederatedTrainer

    grid = _node_grid(tmp_path)
    original = FederatedTrainer.run_round

    def restart_before_round_2(self, round_index):
        if round_index == 2:
            grid.nodes[23] = grid.nodes.pop(3)
            grid.contexts.pop(3)
            grid.contexts[23] = Context(
                run_id=1,
                node_id=23,
                node_config={"partition-id": 0, "output-dir": str(tmp_path / "node_0")},
                state=RecordDict(),
                run_config={},
            )
        return original(self, round_index)

    monkeypatch.setattr(FederatedTrainer, "run_round", restart_before_round_2)
    _same_rounds(serve(grid, _small_flower(tmp_path)), small_in_process)
    round_2 = [m for m in grid.sent if m.metadata.dst_node_id == 23]
    assert [m.metadata.message_type for m in round_2[:2]] == ["query.hello", "train.load_adapter"]
    assert decode_request(round_2[1].content).path == "adapters/round_1/client_0"


def test_a_node_that_lost_its_state_refuses_to_start_over(task_identity):
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "keep-alive-s": 0}, state=RecordDict(), run_config={}
    )
    request = Request(phase="distill", client="client_0", config_text=TINY_TEXT, round=2, fresh=False)
    message = Message(encode_request(request), dst_node_id=7, message_type="train.distill")
    with pytest.raises(FedMKTError, match="holds no adapter of client_0.*Fix:"):
        client_app.handle(message, context)


def test_the_flower_backend_waits_a_finite_time_for_a_client_by_default():
    from fedmkt.federation.flower.server_app import client_wait_s

    config = run_config_from_text(TINY_TEXT)
    assert config.federation.client_timeout_s is None
    assert client_wait_s(config) == 3600.0 + 300.0
    config.federation.client_timeout_s = 60.0
    assert client_wait_s(config) == 60.0 + 300.0


def test_the_quorum_error_names_the_fix_of_each_backend(tmp_path):
    from fedmkt.federation.trainer import FederatedTrainer

    class Failing:
        def __init__(self, name):
            self.name = name
            self.num_public = 3

        def fine_tune(self, round_index):
            raise RuntimeError(f"{self.name} is down in round {round_index}")

        def evaluate(self):
            return {}

    for backend, expected, absent in (
        ("inprocess", "fedmkt fit --config ... --resume", "SuperNodes"),
        ("flower", "--backend flower --resume", "--config ... --resume"),
    ):
        config = run_config_from_text(TINY_TEXT)
        config.federation.backend, config.federation.min_clients = backend, 2
        trainer = FederatedTrainer(Failing("server"), [Failing("client_0"), Failing("client_1")], config, tmp_path)
        with pytest.raises(FedMKTError, match="only 0 of 2 clients answered") as error:
            trainer.run_round(2)
        fix = str(error.value).split("Fix:", 1)[1]
        assert expected in fix and absent not in fix, fix


# ---- a node writes only inside its own folder --------------------------------------------------


def _save_request(path: str, run: str = "demo") -> Message:
    request = Request(phase="save_adapter", client="client_0", config_text=TINY_TEXT, path=path, run=run)
    return Message(encode_request(request), dst_node_id=7, message_type="query.save_adapter")


def test_a_node_refuses_paths_that_leave_its_output_folder_and_deletes_nothing(task_identity, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    node_dir = tmp_path / "node"
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "output-dir": str(node_dir), "keep-alive-s": 0},
        state=RecordDict(),
        run_config={},
    )
    client_app.write_state(context, client_phases.capture_state(_FakeParticipant()))
    for bad in (str(outside), "../outside", "adapters/../../outside", ""):
        with pytest.raises(FedMKTError, match="refused to write.*own output folder"):
            client_app.handle(_save_request(bad), context)
    for bad_run in ("", "..", "../outside", "a/b", str(outside)):  # the run name picks a folder too
        with pytest.raises(FedMKTError, match="refused the run name.*Fix:"):
            client_app.handle(_save_request("adapters/round_1/client_0", run=bad_run), context)
    run_dir = node_dir / "runs" / "demo"
    (run_dir / "adapters").mkdir(parents=True)
    (run_dir / "adapters" / "escape").symlink_to(outside)
    with pytest.raises(FedMKTError, match="outside this node's output folder"):
        client_app.handle(_save_request("adapters/escape"), context)
    (node_dir / "runs" / "elsewhere").symlink_to(outside)
    with pytest.raises(FedMKTError, match="outside this node's output folder"):
        client_app.handle(_save_request("adapters/round_1/client_0", run="elsewhere"), context)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]

    target = run_dir / "adapters" / "round_1" / "client_0"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("the node's own file")
    assert not client_app.handle(_save_request("adapters/round_1/client_0"), context).has_error()
    names = ["adapter_config.json", "adapter_model.safetensors", "node_state.json", "notes.txt"]
    assert sorted(p.name for p in target.iterdir()) == names
    assert (target / "notes.txt").read_text() == "the node's own file"  # nothing there was deleted


def test_two_runs_served_by_one_node_keep_their_adapters_apart(task_identity, tmp_path):
    """Run B's round-1 adapter does not replace run A's: each run has its own folder on the node,
    named after the server's run folder; a node started for one run (`run-dir`) writes there."""
    node_dir = tmp_path / "node"

    def save(run: str, weight: float, node_config: dict) -> None:
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        party = _FakeParticipant()
        party.weights = {"layer.lora_A.weight": torch.full((2, 2), weight)}
        client_app.write_state(context, client_phases.capture_state(party))
        assert not client_app.handle(_save_request("adapters/round_1/client_0", run=run), context).has_error()

    node = {"partition-id": 0, "output-dir": str(node_dir), "keep-alive-s": 0}
    save("run-a", 1.0, node)
    save("run-b", 2.0, node)
    weights = {
        run: load_file(node_dir / "runs" / run / "adapters" / "round_1" / "client_0" / "adapter_model.safetensors")
        for run in ("run-a", "run-b")
    }
    assert weights["run-a"]["layer.lora_A.weight"].unique().tolist() == [1.0]
    assert weights["run-b"]["layer.lora_A.weight"].unique().tolist() == [2.0]
    assert not (node_dir / "adapters").exists()

    only = tmp_path / "the-run"
    save("run-c", 3.0, node | {"run-dir": str(only)})
    written = load_file(only / "adapters" / "round_1" / "client_0" / "adapter_model.safetensors")
    assert written["layer.lora_A.weight"].unique().tolist() == [3.0]


# ---- node-owned data and settings --------------------------------------------------------------

OWN_DATA_TEXT = shipped_configs()["own_data.yaml"].read_text()
REPO = Path(__file__).resolve().parents[1]


def test_each_node_reads_only_its_own_private_file(task_identity, tmp_path, monkeypatch):
    """Node 0 gets its file as a node-config key, node 1 through a node-local settings file; the
    shared config names neither, and each node reads the shared sets and its own file only."""
    from fedmkt.data import parts
    from fedmkt.federation.flower.local import split_config

    monkeypatch.chdir(REPO / "lightning_configs")  # split_config reads text: own_data/ relative to the working folder
    text = OWN_DATA_TEXT.replace("rounds: 2", "rounds: 1")
    shared, nodes = split_config(text, tmp_path / "run")
    assert "client_0.jsonl" not in shared and "client_1.jsonl" not in shared
    assert nodes[0]["data"]["path"] == str(REPO / "lightning_configs/own_data/client_0.jsonl")
    assert nodes[1]["data"]["columns"] == {"id": "qid", "prompt": "question", "choices": "options", "answer": "label"}
    # the launcher lists the shared files in each node's policy (a node reads no file it does not list)
    policy = {key: value for key, value in nodes[0].items() if key in POLICY_KEYS}
    assert {"public", "public-sha256", "shared-eval", "shared-eval-sha256"} <= set(policy)
    assert policy["allow-remote-code"] is False and policy["fedavg"] is False  # nothing the run does not ask
    settings_file = tmp_path / "node_1.yaml"
    settings_file.write_text(yaml.safe_dump({"data": nodes[1]["data"], "output_dir": str(tmp_path / "out_1")} | policy))
    node_configs = {
        10: {"partition-id": 0, "data": nodes[0]["data"]["path"], "output-dir": str(tmp_path / "out_0")} | policy,
        11: {"partition-id": 1, "settings": str(settings_file)},
    }
    read: dict[int, list[str]] = {}
    original = parts.load_source
    current = []

    def recording(source, key, expected=None, answers_optional=False):
        read.setdefault(current[-1], []).append(f"{key}={Path(source.path).name}")
        return original(source, key, expected, answers_optional)

    monkeypatch.setattr(parts, "load_source", recording)
    grid = FakeGrid({10: client_app.handle, 11: client_app.handle}, node_configs)
    config = run_config_from_text(shared)
    for index, node_id in enumerate((10, 11)):
        current.append(node_id)
        proxy = RemoteParticipant(f"client_{index}", node_id, grid, shared, tmp_path, num_public=8)
        stats = proxy.fine_tune(1)
        assert stats.task_loss == stats.task_loss  # trained on a non-empty private set (not NaN)
    assert config.clients[0].data is None and config.clients[1].data is None
    assert sorted(read[10]) == ["clients[0].data=client_0.jsonl", "data.eval=eval.jsonl", "data.public=public.jsonl"]
    assert sorted(read[11]) == ["clients[1].data=client_1.jsonl", "data.eval=eval.jsonl", "data.public=public.jsonl"]


def test_a_node_with_another_tokenizer_is_refused_before_round_1(task_identity):
    from fedmkt.alignment.vocab_map import tokenizer_fingerprint
    from fedmkt.models import load_tokenizer

    config = run_config_from_text(TINY_TEXT)
    config.flower.wait_for_nodes_s = 5
    expected = tokenizer_fingerprint(load_tokenizer(config.clients[0].model, config.cache_dir))
    fingerprints = {"client_0": expected, "client_1": expected}
    grid = FakeGrid(
        {11: client_app.handle, 12: client_app.handle},
        {11: {"partition-id": 0}, 12: {"partition-id": 1, "model": "embedded:gemma3-270m"}},  # the server's model
    )
    with pytest.raises(FedMKTError) as error:
        find_client_nodes(grid, config, TINY_TEXT, fingerprints)
    line = str(error.value)
    assert "\n" not in line and "client_1: this node's model embedded:gemma3-270m has a tokenizer" in line
    assert line.count("Fix:") == 1 and "--node-config model=" in line
    right = FakeGrid({11: client_app.handle, 12: client_app.handle}, {11: {"partition-id": 0}, 12: {"partition-id": 1}})
    assert find_client_nodes(right, config, TINY_TEXT, fingerprints) == {"client_0": 11, "client_1": 12}


def test_launch_local_pins_the_server_and_clients_to_gpus_in_turn(tmp_path, capsys):
    from fedmkt.federation.flower.local import gpu_assignment

    assert gpu_assignment(None, 2) == (None, [None, None])
    assert gpu_assignment("0,1", 3) == ("0", ["1", "0", "1"])
    assert gpu_assignment("2, 3, 5", 2) == ("2", ["3", "5"])
    code = main(["launch-local", "--config", "tiny", "--gpus", "first", "--run_dir", str(tmp_path / "run")])
    assert code == 2 and "--gpus 'first'" in _error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was started or written


def test_private_client_data_in_the_shared_config_is_refused_on_flower(tmp_path, capsys):
    code = main(["fit", "--config", "own_data", "--backend", "flower", "--run_dir", str(tmp_path / "run")])
    assert code == 2
    line = _error_line(capsys)
    assert "clients[0].data, clients[1].data set in the run config" in line and "launch-local" in line


# ---- one-line errors ------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedmkt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "Fix:" in lines[0]
    return lines[0]


def test_unreachable_superlink_is_one_line(tmp_path, capsys):
    port = _free_ports(1)[0]
    code = main(
        [
            "fit",
            "--config",
            "tiny",
            "--backend",
            "flower",
            "--flower.superlink",
            f"127.0.0.1:{port}",
            "--flower.insecure",
            "true",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert f"127.0.0.1:{port}" in _error_line(capsys)


def test_missing_flwr_and_a_resume_without_checkpoint_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submit.shutil, "which", lambda *args, **kwargs: None)
    assert main(["fit", "--config", "tiny", "--backend", "flower", "--run_dir", str(tmp_path / "run")]) == 2
    assert "pip install" in _error_line(capsys)
    assert main(["fit", "--config", "tiny", "--backend", "flower", "--resume", str(tmp_path)]) == 2
    assert "--overwrite in place of --resume" in _error_line(capsys)


def test_multi_process_parties_are_refused_on_the_flower_backend(tmp_path, capsys):
    code = main(
        [
            "fit",
            "--config",
            "tiny",
            "--backend",
            "flower",
            "--server.trainer.strategy",
            "ddp",
            "--server.trainer.devices",
            "2",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "devices > 1: server)" in _error_line(capsys)


def test_backend_is_a_config_key_with_a_command_line_shorthand():
    assert parse_run_config(["--config", "tiny"]).federation.backend == "inprocess"
    assert parse_run_config(["--config", "tiny", "--federation.backend", "flower"]).federation.backend == "flower"
    for name, path in shipped_configs().items():
        assert "backend: inprocess" in path.read_text(), name


def test_the_packaged_flower_app_builds_into_a_fab():
    import tomli
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    app = submit.app_dir()
    config = tomli.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert valid, errors
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert {"pyproject.toml", "fedmkt_app/server_app.py", "fedmkt_app/client_app.py"} <= set(names)


# ---- end to end: a SuperLink and two SuperNodes on 127.0.0.1 --------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink and SuperNodes for client_0 and client_1, insecure, on 127.0.0.1 (tests only),
    started by fedmkt's own `local_federation` (what `fedmkt launch-local` runs)."""
    if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
        pytest.skip("Flower's flower-superlink/flower-supernode commands are not installed")
    from fedmkt.federation.flower.local import local_federation

    base = tmp_path_factory.mktemp("flower")
    nodes = [{"partition-id": index, "output-dir": str(base / f"node_{index}")} for index in range(2)]
    from fedmkt.federation.flower.control_auth import TOKEN_ENV

    with local_federation(base, nodes, gpus=None) as (link, federation):
        # The operator's token for its Control API: what `fedmkt fit --backend flower` reads to submit.
        before = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = str(link.control_token)
        try:
            yield {"address": link.address, "logs": federation.logs, "token": link.control_token}
        finally:
            if before is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = before


# own_data.yaml as shipped (2 rounds, one private file per client), through `fedmkt launch-local`.
# Flower starts a ClientApp per message (forked from a process that imported it), and the worker builds each party once; still the
# suite's slowest test. The rounds cross every state hand-over: fine-tune → share (restored
# adapter), share → distill (restored public losses), distill → evaluate / save_adapter (restored
# distilled adapter), round 1 → round 2 fine-tune.
SETTINGS = ["--config", "own_data", "--logging.wandb", "false"]
ROUNDS = 2


def _processes_naming(text: str) -> list[str]:
    """Command lines of running processes whose command line or environment contains `text`: what
    launch-local starts names its run_dir in FLWR_HOME, and their children inherit it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environment = (entry / "environ").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and (text in command or text in environment):
                found.append(command)
    return found


@pytest.mark.slow
def test_launch_local_reproduces_the_in_process_run(tmp_path, monkeypatch):
    if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
        pytest.skip("Flower's flower-superlink/flower-supernode commands are not installed")
    monkeypatch.chdir(REPO / "lightning_configs")  # the copy's own_data/ files, from the working folder
    # Clients that fine-tune for a few seconds, so that "at the same time" can show in the spans.
    config = tmp_path / "own_data_longer.yaml"
    text = shipped_configs()["own_data.yaml"].read_text()
    config.write_text(
        text.replace("\n    optimizer: {lr: 1.0e-3}", "\n    local_epochs: 150\n    optimizer: {lr: 1.0e-3}")
    )
    assert config.read_text().count("local_epochs: 150") == 2
    settings = [*SETTINGS, "--config", str(config)]
    flower_dir, inprocess_dir = tmp_path / "flower", tmp_path / "inprocess"
    started = time.monotonic()
    code = main(["launch-local", *settings, "--run_dir", str(flower_dir)])
    logs = [p.name + ":\n" + p.read_text()[-3000:] for p in sorted((flower_dir / "nodes").glob("*.log"))]
    assert code == 0, logs
    flower_seconds = time.monotonic() - started
    assert _processes_naming(str(flower_dir)) == []  # the SuperLink, SuperNodes and their apps are gone
    assert main(["fit", *settings, "--run_dir", str(inprocess_dir)]) == 0

    # The shared config names no client's private file; each node got its own.
    shared = (flower_dir / "config.yaml").read_text()
    assert "client_0.jsonl" not in shared and "client_1.jsonl" not in shared
    for index in (0, 1):
        node = yaml.safe_load((flower_dir / "nodes" / f"client_{index}" / "node.yaml").read_text())
        assert Path(node["data"]["path"]).name == f"client_{index}.jsonl"

    flower = json.loads((flower_dir / "summary.json").read_text())
    inprocess = json.loads((inprocess_dir / "summary.json").read_text())
    assert flower["config"]["federation"]["backend"] == "flower"
    assert set(flower["zero_shot"]) == set(inprocess["zero_shot"]) == {"server", "client_0", "client_1"}
    for party, scores in inprocess["zero_shot"].items():
        assert flower["zero_shot"][party]["eval_accuracy"] == pytest.approx(scores["eval_accuracy"], abs=1e-4)
    assert len(flower["rounds"]) == len(inprocess["rounds"]) == ROUNDS
    for ours, theirs in zip(flower["rounds"], inprocess["rounds"]):
        assert ours["failed"] == theirs["failed"] == {}
        assert set(ours["parties"]) == set(theirs["parties"])
        for party, expected in theirs["parties"].items():
            got = ours["parties"][party]
            assert got["selected"] == expected["selected"], party
            assert got["teacher_counts"] == expected["teacher_counts"], party
            assert (
                got["bytes_sent"] == expected["bytes_sent"] and got["bytes_received"] == expected["bytes_received"]
            ), party
            for key in ("task_loss", "distill_task_loss", "kd_loss", "eval_accuracy", "eval_accuracy_norm"):
                if key in expected:
                    assert got[key] == pytest.approx(expected[key], abs=1e-4), (party, key)
            assert [s["phase"] for s in got["timeline"]] == [s["phase"] for s in expected["timeline"]], party
        assert ours["parties"]["server"]["selected"] > 0  # the server really distilled from the clients
        # All clients at once: the two SuperNodes fine-tuned at the same time, each span its node's own.
        (a,), (b,) = (
            [s for s in ours["parties"][c]["timeline"] if s["phase"] == "fine_tune"] for c in ("client_0", "client_1")
        )
        assert a["start"] < b["end"] and b["start"] < a["end"], (a, b)

    # Client adapters are written by their SuperNodes, into run_dir as launch-local tells them.
    for round_index in range(1, ROUNDS + 1):
        for party in ("server", "client_0", "client_1"):
            ours = load_file(flower_dir / "adapters" / f"round_{round_index}" / party / "adapter_model.safetensors")
            theirs = load_file(
                inprocess_dir / "adapters" / f"round_{round_index}" / party / "adapter_model.safetensors"
            )
            assert ours.keys() == theirs.keys()
            assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs), (round_index, party)
    print(f"launch-local: {flower_seconds:.0f} s for {ROUNDS} own_data rounds")


@pytest.mark.slow
def test_launch_local_killed_after_round_1_resumes_to_the_in_process_run(tmp_path, monkeypatch):
    """Everything stops after round 1 (SIGTERM to launch-local); `launch-local --resume` on the saved
    shared config starts a new SuperLink and SuperNodes, whose nodes restore their adapters."""
    if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
        pytest.skip("Flower's flower-superlink/flower-supernode commands are not installed")
    monkeypatch.chdir(REPO)
    run_dir, inprocess_dir = tmp_path / "flower", tmp_path / "inprocess"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            ["fedmkt", "launch-local", *SETTINGS, "--run_dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT
        )
        checkpoint = run_dir / "checkpoint" / "checkpoint.json"
        deadline = time.monotonic() + 900
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checkpoint.is_file(), (tmp_path / "first.log").read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    assert (
        f"fedmkt launch-local --config {run_dir / 'config.yaml'} --resume {run_dir}"
        in (tmp_path / "first.log").read_text()
    )
    assert json.loads(checkpoint.read_text())["round"] == 1 and _processes_naming(str(run_dir)) == []

    assert main(["launch-local", "--config", str(run_dir / "config.yaml"), "--resume", str(run_dir)]) == 0
    assert main(["fit", *SETTINGS, "--run_dir", str(inprocess_dir)]) == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    _same_rounds(resumed, json.loads((inprocess_dir / "summary.json").read_text()))


@pytest.mark.slow
def test_launch_local_stops_everything_it_started_on_ctrl_c(tmp_path):
    if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
        pytest.skip("Flower's flower-superlink/flower-supernode commands are not installed")
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        ["fedmkt", "launch-local", "--config", "tiny", "--logging.wandb", "false", "--run_dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 300
    while len(_processes_naming(str(run_dir / "nodes"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    assert len(_processes_naming(str(run_dir / "nodes"))) >= 3  # the SuperLink and two SuperNodes run
    time.sleep(5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT before round 1 finished" in err
    assert _processes_naming(str(run_dir)) == []


@pytest.mark.slow
def test_ctrl_c_on_fit_stops_the_run_on_the_superlink_too(superlink, tmp_path):
    process = subprocess.Popen(
        [
            "fedmkt",
            "fit",
            *["--config", "tiny", "--backend", "flower", "--flower.superlink", superlink["address"]],
            *["--flower.insecure", "true", "--logging.wandb", "false", "--run_dir", str(tmp_path / "run")],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_id = None
    for line in process.stdout:
        match = re.search(r"Successfully started run (\d+)", line)
        if match:
            run_id = int(match.group(1))
            break
    assert run_id is not None, process.communicate()
    time.sleep(5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "stopped by SIGINT" in err, err

    home = tmp_path / "flwr-home"
    submit.write_flower_home(
        home, run_config_from_text(TINY_TEXT.replace("127.0.0.1:8000", superlink["address"])).flower
    )
    (home / "config.toml").write_text((home / "config.toml").read_text() + "insecure = true\n")
    from fedmkt.federation.flower.control_auth import write_cli_credentials

    write_cli_credentials(home, superlink["address"], superlink["token"])
    command = ["flwr", "ls", submit.CONNECTION, "--run-id", str(run_id), "--format", "json"]
    deadline, status = time.monotonic() + 60, ""
    while not status.startswith("finished") and time.monotonic() < deadline:
        listing = subprocess.run(command, env=dict(os.environ, FLWR_HOME=str(home)), capture_output=True, text=True)
        status = str((json.loads(listing.stdout or "{}").get("runs") or [{}])[0].get("status", ""))
        time.sleep(1)
    assert status == "finished:stopped", status


@pytest.mark.slow
def test_too_few_supernodes_is_one_line_from_the_server_app(superlink, tmp_path, capsys):
    """Three clients, two SuperNodes: the ServerApp gives up after flower.wait_for_nodes_s and
    the FedMKTError it raised reaches the command line through Flower's run status."""
    data = yaml.safe_load(TINY_TEXT)
    data["clients"].append(data["clients"][0])
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(
        [
            "fit",
            "--config",
            str(path),
            "--backend",
            "flower",
            "--flower.superlink",
            superlink["address"],
            "--flower.insecure",
            "true",
            "--flower.wait_for_nodes_s",
            "2",
            "--run_dir",
            str(tmp_path / "run"),
            "--logging.wandb",
            "false",
        ]
    )
    assert code == 2
    line = _error_line(capsys)
    assert "2 of the 3 SuperNodes" in line and "partition-id" in line
