"""The node worker's socket: a private folder, a challenge only the key's holder answers, and no caller can stall it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import time
from multiprocessing.connection import Client

import pytest

pytest.importorskip("flwr")

from fedmkt.errors import FedMKTError  # noqa: E402
from fedmkt.federation.flower import worker  # noqa: E402
from fedmkt.federation.flower.messages import Request  # noqa: E402
from fedmkt.federation.flower.node import node_settings  # noqa: E402


@pytest.fixture
def running(tmp_path):
    """A worker of a stand-in SuperNode, answered once (so it is past its imports and listening)."""
    settings = node_settings({"partition-id": 0, "output-dir": str(tmp_path / "node"), "keep-alive-s": 60})
    supernode = subprocess.Popen(["sleep", "600"])
    job = worker.Job(
        Request(phase="hello", client="client_0", config_text=""), settings, None, 1, 1, supernode.pid, os.getpid()
    )
    try:
        reply, _ = worker.call(job)
        assert reply.info["client"] == "client_0"
        folder = worker.worker_folder(settings)
        yield job, folder, json.loads((folder / "address.json").read_text())
    finally:
        supernode.kill()
        supernode.wait()


def test_the_worker_folder_socket_and_key_are_the_node_users_alone(running):
    _, folder, record = running
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "key").stat().st_mode & 0o777 == 0o600
    socket_folder = os.path.dirname(record["socket"])
    assert os.stat(socket_folder).st_mode & 0o777 == 0o700 and os.stat(socket_folder).st_uid == os.getuid()
    assert "port" not in record  # no TCP port: nothing off this machine, or another user's process, reaches it


def test_a_silent_caller_does_not_hold_up_a_real_request(running):
    job, _, record = running
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(record["socket"])  # connects, then says nothing
    try:
        start = time.monotonic()
        reply, _ = worker.call(job)
        waited = time.monotonic() - start
    finally:
        silent.close()
    assert reply.info["client"] == "client_0"
    # At most about one handshake timeout (5 s), never the worker's 60 s keep-alive; the margin is
    # for a loaded 2-core machine, where the call itself can take seconds.
    assert waited < worker.HANDSHAKE_TIMEOUT_S + 25


def _same_worker_answers_soon(job, folder, record) -> float:
    """Seconds a real call takes, asserting it was this worker (not a fresh one started around it)."""
    start = time.monotonic()
    reply, _ = worker.call(job)
    waited = time.monotonic() - start
    assert reply.info["client"] == "client_0"
    assert json.loads((folder / "address.json").read_text())["pid"] == record["pid"]
    return waited


def test_a_caller_that_sends_half_a_message_is_hung_up_at_the_deadline(running):
    """The attack: one byte of a message header once held the worker's only accepting thread."""
    job, folder, record = running
    stalling = socket.socket(socket.AF_UNIX)
    stalling.connect(record["socket"])
    stalling.sendall(b"\x00")
    try:
        assert _same_worker_answers_soon(job, folder, record) < 4  # its handshake runs beside the stalled one
        stalling.settimeout(worker.HANDSHAKE_TIMEOUT_S + 10)
        stalling.recv(64)  # the challenge
        assert stalling.recv(64) == b""  # then hung up at the deadline, though the caller never closed
    finally:
        stalling.close()


def test_silent_callers_side_by_side_do_not_add_up(running):
    """The attack: five silent connections once stalled the worker 5 s each."""
    job, folder, record = running
    silent = []
    for _ in range(5):
        silent.append(socket.socket(socket.AF_UNIX))
        silent[-1].connect(record["socket"])
    try:
        assert _same_worker_answers_soon(job, folder, record) < 4
    finally:
        for connection in silent:
            connection.close()


def test_a_superseded_worker_leaves_and_removes_its_socket_folder(running):
    _, folder, record = running
    other = subprocess.Popen(["sleep", "60"])
    try:
        taken = dict(record, pid=other.pid, socket="/nonexistent/socket")
        (folder / "address.json").write_text(json.dumps(taken))  # another worker has taken the folder over
        deadline = time.monotonic() + 10
        while worker._alive(record["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not worker._alive(record["pid"])
        assert not os.path.exists(os.path.dirname(record["socket"]))
        assert json.loads((folder / "address.json").read_text())["pid"] == other.pid  # not its to withdraw
    finally:
        other.kill()
        other.wait()


def test_a_caller_without_the_key_is_refused_and_the_worker_serves_on(running):
    job, folder, record = running
    intruder = Client(record["socket"], family="AF_UNIX")
    challenge = intruder.recv_bytes(64)
    intruder.send_bytes(hmac.new(b"a guessed key", challenge, hashlib.sha256).digest())
    assert intruder.recv_bytes(8) == b"no"
    with pytest.raises(EOFError):  # the worker hung up without reading a request
        intruder.recv_bytes()
    reply, _ = worker.call(job)
    assert reply.info["client"] == "client_0"


def test_a_worker_folder_another_user_owns_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    folder = tmp_path / "foreign"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 12345)
    with pytest.raises(FedMKTError, match=r"owned by uid 12345 .* Fix:"):
        worker.private_folder(folder)


def test_an_open_folder_of_this_user_is_narrowed_to_0700(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o755)
    assert worker.private_folder(folder).stat().st_mode & 0o777 == 0o700
