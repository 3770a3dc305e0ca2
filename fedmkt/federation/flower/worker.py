"""A node's long-lived party process: the client's built party stays in memory between messages.

Flower starts a fresh ClientApp process for every message, and rebuilding the party there (torch
and transformers imports, model load, tokenised data, vocabulary maps) costs tens of seconds per
message. So the ClientApp only forwards each request to this worker: the node's first message
starts it, later ones reuse it, and it answers them with `client_phases.answer` on a `PartyCache`.
The client's state still travels with every request and reply (Flower's `context.state` stays the
source of truth), so a worker that died or was replaced costs one rebuild, never a result.

The worker listens on a Unix socket in a private folder of its own (mode 0700, under the system's
temporary directory: socket paths must be short) and accepts only callers that prove they know
the key in its folder: an HMAC-SHA256 challenge, answered within `HANDSHAKE_TIMEOUT_S` and
compared in constant time; only then are the pickled requests read. Each caller's handshake runs in
a thread of its own, hung up at that deadline whatever the caller sends (silence, or half a
message), and at most `MAX_HANDSHAKES` run at once (the socket's backlog holds more), so no caller
can hold up a real request; the requests themselves are answered one at a time. The folder is
`<output-dir>/.fedmkt-worker/client_N/` (mode 0700; a folder another user owns, or that others can
read, is refused): `address.json`, `key` (mode 0600) and `worker.log` (each phase and its
progress). The worker
exits when the SuperNode that started it is gone, when the ClientApp process waiting for a phase
dies (a stopped run stops its phase), when another worker has taken its folder over (between
phases: its model goes with it, and its socket folder is removed), or after `keep-alive-s` seconds
without a request (node setting; 0: no worker, each ClientApp process answers its own message).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Optional

import psutil
from filelock import FileLock

from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import Reply, Request
from fedmkt.federation.flower.node import NodeSettings
from fedmkt.files import atomic_write_text

WORKER_DIR = ".fedmkt-worker"
START_TIMEOUT_S = 300.0
"""How long a ClientApp waits for a worker it started to listen."""
HANDSHAKE_TIMEOUT_S = 5.0
"""How long the worker waits for a caller's answer to its challenge before dropping the caller."""
MAX_HANDSHAKES = 8
"""Callers in their handshake at once; one more is hung up at once (a real caller retries)."""
BACKLOG = 64
"""Connections the socket queues before the worker accepts them."""


@dataclass
class Job:
    """One request for the worker, with what the ClientApp process knows of the node and the run."""

    request: Request
    settings: NodeSettings
    state: Optional[dict[str, bytes]]
    node_id: int
    run_id: int
    launcher_pid: int
    """The process that started the ClientApp on the SuperNode (Flower's SuperExec, which exits with its
    SuperNode): the worker leaves with it, and a worker of another SuperNode steps aside."""
    caller_pid: int


def call(job: Job) -> tuple[Reply, Optional[dict[str, bytes]]]:
    """Answer `job` in this node's worker, starting one if none is listening."""
    folder = worker_folder(job.settings)
    for _ in range(2):  # a worker of an earlier SuperNode answers "stale" once, then a new one starts
        connection = _connection(folder, job.launcher_pid, job.settings.keep_alive_s)
        try:
            connection.send(job)
            outcome = connection.recv()
        except (EOFError, OSError) as error:
            raise FedMKTError(
                f"{job.settings.client}: the node's fedmkt worker stopped during {job.request.phase} ({type(error).__name__}). "
                f"Fix: see {folder / 'worker.log'}; the next message starts a fresh worker."
            ) from None
        finally:
            connection.close()
        if outcome[0] == "ok":
            return outcome[1], outcome[2]
        if outcome[0] == "error":
            name, text = outcome[1], outcome[2]
            raise FedMKTError(text) if name == "FedMKTError" else RuntimeError(f"{name}: {text}")
        _wait_gone(folder)  # "stale": that worker leaves; the next attempt starts this SuperNode's own
    raise FedMKTError(
        f"{job.settings.client}: no fedmkt worker of this SuperNode could be reached. Fix: see {folder / 'worker.log'}."
    )


def worker_folder(settings: NodeSettings) -> Path:
    """Where the worker of this node's client keeps its address, key and log."""
    return settings.output_dir / WORKER_DIR / settings.client


def stop_workers(output_dir: Path, launcher_pids: set[int], timeout_s: float = 20.0) -> None:
    """End the workers under `output_dir` that these SuperNodes started, and wait until they are gone
    (they would leave by themselves within a second of their SuperNode; this makes it certain)."""
    pids = []
    for address in Path(output_dir).glob(f"{WORKER_DIR}/*/address.json"):
        record = _address(address.parent) or {}
        if record.get("launcher_pid") in launcher_pids and _alive(int(record.get("pid", 0))):
            pids.append(int(record["pid"]))
            os.kill(pids[-1], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _connection(folder: Path, launcher_pid: int, keep_alive_s: float) -> Connection:
    """A connection to the listening worker of `folder`, started here if there is none."""
    private_folder(folder)
    with FileLock(str(folder / "start.lock")):
        connection = _connect(folder)
        if connection is not None:
            return connection
        process = _start(folder, launcher_pid, keep_alive_s)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FedMKTError(
                    f"the node's fedmkt worker exited at start (code {process.returncode}). Fix: see {folder / 'worker.log'}."
                )
            record = _address(folder)
            if record and record.get("pid") == process.pid:
                connection = _connect(folder)
                if connection is not None:
                    return connection
            time.sleep(0.1)
        process.kill()
        raise FedMKTError(
            f"the node's fedmkt worker did not start in {START_TIMEOUT_S:.0f} s. Fix: see {folder / 'worker.log'}."
        )


def _address(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "address.json").read_text())
    except (OSError, ValueError):
        return None


def private_folder(folder: Path) -> Path:
    """`folder`, created with mode 0700 if missing (and narrowed to it if this user owns it); refused
    if another user owns it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:  # ours, made by an older fedmkt: tighten it
        folder.chmod(0o700)
        info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise FedMKTError(
            f"the fedmkt worker folder {folder} is owned by uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}; "
            f"it must be this user's ({os.getuid()}) alone. Fix: remove it, or `chmod 700` it as its owner."
        )
    return folder


def _connect(folder: Path) -> Optional[Connection]:
    record = _address(folder)
    if record is None or not _alive(int(record.get("pid", 0))):
        return None
    try:
        socket_path = Path(record["socket"])
        private_folder(socket_path.parent)  # never hand the key's proof to a socket someone else placed
        connection = Client(str(socket_path), family="AF_UNIX")
    except (OSError, EOFError, KeyError, ValueError, FedMKTError):  # gone since it wrote the file
        return None
    try:
        if not connection.poll(HANDSHAKE_TIMEOUT_S):
            raise OSError("no challenge")
        challenge = connection.recv_bytes(64)
        connection.send_bytes(hmac.new((folder / "key").read_bytes(), challenge, hashlib.sha256).digest())
        if not connection.poll(HANDSHAKE_TIMEOUT_S) or connection.recv_bytes(8) != b"ok":
            raise OSError("refused")
    except (OSError, EOFError):  # another worker's key, or it left
        connection.close()
        return None
    return connection


def _authenticated(connection: Connection, key: bytes) -> bool:
    """Whether the caller proves it knows `key`: HMAC-SHA256 of a fresh challenge, within the timeout."""
    try:
        challenge = secrets.token_bytes(32)
        connection.send_bytes(challenge)
        if not connection.poll(HANDSHAKE_TIMEOUT_S):
            return False  # a silent caller is dropped, not waited for
        answer = connection.recv_bytes(64)
        expected = hmac.new(key, challenge, hashlib.sha256).digest()
        ok = hmac.compare_digest(answer, expected)
        connection.send_bytes(b"ok" if ok else b"no")
        return ok
    except (OSError, EOFError):
        return False


def _wait_gone(folder: Path, timeout_s: float = 10.0) -> None:
    record = _address(folder) or {}
    deadline = time.monotonic() + timeout_s
    while _alive(int(record.get("pid", 0))) and time.monotonic() < deadline:
        time.sleep(0.05)


def _start(folder: Path, launcher_pid: int, keep_alive_s: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedmkt.federation.flower.worker", "--folder", str(folder)]
    command += ["--launcher-pid", str(launcher_pid), "--keep-alive-s", str(keep_alive_s)]
    with open(folder / "worker.log", "ab") as log:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


# ---- the worker process ----------------------------------------------------------------------


def serve(folder: Path, launcher_pid: int, keep_alive_s: float) -> None:
    """Listen for this node's requests until the SuperNode is gone or nothing came for `keep_alive_s`."""
    private_folder(folder)
    key = secrets.token_bytes(32)
    key_file = folder / "key"
    key_file.unlink(missing_ok=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    socket_path = Path(tempfile.mkdtemp(prefix="fedmkt-worker-")) / "socket"  # mkdtemp: mode 0700
    listener = Listener(str(socket_path), family="AF_UNIX", backlog=BACKLOG)
    _OWN["socket_dir"] = socket_path.parent
    record = {"socket": str(socket_path), "pid": os.getpid(), "launcher_pid": launcher_pid}
    atomic_write_text(folder / "address.json", json.dumps(record))
    print(
        f"fedmkt worker {os.getpid()}: listening on {socket_path} for the ClientApps of process {launcher_pid}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: _leave(folder))
    status = {"busy_caller": 0, "last": None}  # no idle clock while the imports below run
    threading.Thread(target=_watch, args=(folder, launcher_pid, keep_alive_s, status), daemon=True).start()
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_accept, args=(listener, key, jobs), daemon=True).start()

    from fedmkt.federation.flower.client_phases import PartyCache, answer  # the heavy imports, once

    status["last"] = time.monotonic()
    cache = PartyCache()
    while True:
        connection, job = jobs.get()
        with connection:
            if job.launcher_pid != launcher_pid:  # this folder now belongs to a restarted SuperNode
                connection.send(("stale",))
                _leave(folder)
            status["busy_caller"] = job.caller_pid
            started = time.time()
            try:
                reply, state = answer(job.request, job.settings, job.state, job.node_id, cache, job.run_id)
                outcome = ("ok", reply, state)
            except Exception as error:  # the ClientApp raises it, so Flower reports it as the node's error
                outcome = ("error", type(error).__name__, " ".join(str(error).split()))
            print(
                f"fedmkt worker: {job.request.client} {job.request.phase} round {job.request.round}: "
                f"{outcome[0]} in {time.time() - started:.1f} s (party builds so far: {cache.builds})",
                flush=True,
            )
            try:
                connection.send(outcome)
            except OSError:  # the ClientApp process is gone; its state is Flower's, nothing is lost
                pass
            status["busy_caller"], status["last"] = 0, time.monotonic()


_OWN: dict[str, Path] = {}
"""This worker's own socket folder (removed when it leaves, whoever's address the folder holds)."""


def _accept(listener: Listener, key: bytes, jobs: queue.Queue) -> None:
    """Accept callers for ever, each handshake in a thread of its own, at most `MAX_HANDSHAKES` at once."""
    slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError):  # a caller that is gone already
            continue
        if not slots.acquire(blocking=False):  # too many callers mid-handshake: this one is hung up
            connection.close()
            continue
        threading.Thread(target=_admit, args=(connection, key, jobs, slots), daemon=True).start()


def _admit(connection: Connection, key: bytes, jobs: queue.Queue, slots: threading.BoundedSemaphore) -> None:
    """Queue the caller's request if it proves it holds the key within the deadline; else hang up."""
    deadline = threading.Timer(HANDSHAKE_TIMEOUT_S, _hang_up, args=(connection,))
    deadline.start()
    try:
        admitted = _authenticated(connection, key)
    finally:
        deadline.cancel()
        slots.release()
    if not admitted:  # without the key, silent, or too slow: dropped
        connection.close()
        return
    try:
        job: Job = connection.recv()  # a caller that holds the key
    except (OSError, EOFError):
        connection.close()
        return
    jobs.put((connection, job))


def _hang_up(connection: Connection) -> None:
    """Wake a handshake blocked on a caller's half-sent message by shutting the socket down."""
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as handle:
            handle.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


def _watch(folder: Path, launcher_pid: int, keep_alive_s: float, status: dict) -> None:
    while True:
        time.sleep(0.5)
        caller = status["busy_caller"]
        if not _alive(launcher_pid) or (caller and not _alive(caller)):
            _leave(folder)
        if not caller and status["last"] is not None and time.monotonic() - status["last"] > keep_alive_s:
            _leave(folder)
        record = _address(folder)
        if not caller and status["last"] is not None and record and record.get("pid") != os.getpid():
            _leave(folder)  # superseded: another worker answers this node now


def _leave(folder: Path) -> None:
    """Exit at once (also from the watch thread, mid-phase): withdraw the address if it is ours, and
    remove this worker's own socket folder in any case."""
    record = _address(folder)
    if record and record.get("pid") == os.getpid():
        (folder / "address.json").unlink(missing_ok=True)
    if "socket_dir" in _OWN:
        shutil.rmtree(_OWN["socket_dir"], ignore_errors=True)
    print(f"fedmkt worker {os.getpid()}: leaving", flush=True)
    os._exit(0)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="fedmkt's long-lived party process of one SuperNode")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--launcher-pid", type=int, required=True)
    parser.add_argument("--keep-alive-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    serve(args.folder, args.launcher_pid, args.keep_alive_s)


if __name__ == "__main__":
    main()
