"""ClientApp processes forked from one that has already imported them.

Flower's SuperExec starts a `flwr-clientapp` process for every message, and importing Flower and
fedmkt's ClientApp takes about a second of it before the process does anything. On a node started
by `launch-local`, one process (`serve`) imports them once and listens on a Unix socket in the
operator's private credentials folder. `flwr-clientapp` is then a launcher (`relay`) that imports
nothing heavy: it hands the server its arguments, environment, working folder and standard streams,
the server forks a child that runs Flower's ClientApp main with them (the app check of `app_trust`
in place), and the launcher exits with the child's status, passing on a SIGTERM or SIGINT it gets.
Where no server listens, the launcher runs the ClientApp itself, as before.

The server forks only while it runs no thread, and each child reseeds `random`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

SERVER_ENV = "FEDMKT_CLIENTAPP_SERVER"
"""The environment variable naming the socket of the node's ClientApp server."""

_HEADER = struct.Struct("!I")
_STREAMS = 3


def relay(socket_path: str, argv: list[str]) -> Optional[int]:
    """Run the ClientApp `argv` in a child of the server at `socket_path`; its exit status, or None
    when no server answers (the caller runs the ClientApp itself)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
    except OSError:
        connection.close()
        return None
    with connection:
        request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(connection, [_HEADER.pack(len(request)) + request], list(range(_STREAMS)))
        reader = connection.makefile("r")
        child = int(reader.readline())

        def forward(signum: int, _frame) -> None:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        status = reader.readline()
        code = int(status) if status.strip() else 1
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def serve(socket_path: Path, main: Optional[Callable[[], Any]] = None) -> None:
    """Import the ClientApp once, then fork a child that runs `main` (Flower's ClientApp main, with
    the app check in place) for every launcher that connects."""
    if main is None:
        from flwr.supernode.cli import flwr_clientapp as main

        from fedmkt.federation.flower import app_trust

        app_trust.install()
        app_trust.own_app_sha256()  # computed once, inherited by every child
        import fedmkt.federation.flower.client_app  # noqa: F401  (what the app's module imports)

    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    socket_path.chmod(0o600)
    listener.listen(64)
    print(f"fedmkt ClientApp server {os.getpid()}: listening on {socket_path}", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            connection, _ = listener.accept()
            child = _fork_child(connection, listener, main)
            if child is None:
                connection.close()
            else:
                children[child] = connection
        _report_exited(children)


def _fork_child(connection: socket.socket, listener: socket.socket, main) -> Optional[int]:
    """Read one launcher's request and fork the child that runs it; the child's pid (None: bad request)."""
    try:
        data, fds, _, _ = socket.recv_fds(connection, 1 << 20, _STREAMS)
        (length,) = _HEADER.unpack_from(data)
        while len(data) < _HEADER.size + length:
            chunk = connection.recv(1 << 20)
            if not chunk:
                raise OSError("the launcher hung up")
            data += chunk
        request = json.loads(data[_HEADER.size : _HEADER.size + length])
    except (OSError, ValueError, struct.error):
        return None
    if len(fds) != _STREAMS:
        for fd in fds:
            os.close(fd)
        return None
    if threading.active_count() != 1:  # forking with threads could copy a held lock
        raise RuntimeError("the ClientApp server started a thread; it forks only without")
    pid = os.fork()
    if pid == 0:
        _run_child(request, fds, listener, connection, main)
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    return pid


def _run_child(request: dict, fds: list[int], listener: socket.socket, connection: socket.socket, main) -> None:
    """In the forked child: become the launcher's ClientApp process, run it, and exit with its status."""
    code = 1
    try:
        listener.close()
        connection.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = os.fdopen(0, "r", closefd=False)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        random.seed()
        sys.argv = ["flwr-clientapp", *request["argv"][1:]]
        try:
            result = main()
            code = result if isinstance(result, int) else 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (whatever happens, the child must not return into the server's loop)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _report_exited(children: dict[int, socket.socket]) -> None:
    """Tell each launcher whose child has exited its status, and close its connection."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        try:
            connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:
            pass
        connection.close()


def launcher_script(python: str) -> str:
    """The `flwr-clientapp` command of a local federation: relay to the node's server, else run here."""
    return (
        f"#!{python}\n"
        "import os, sys\n"
        f"_path = os.environ.get({SERVER_ENV!r})\n"
        "if _path:\n"
        "    from fedmkt.federation.flower.clientapp_server import relay\n"
        "    _code = relay(_path, sys.argv)\n"
        "    if _code is not None:\n"
        "        sys.exit(_code)\n"
        "from fedmkt.federation.flower.app_trust import install\n"
        "install()\n"
        "from flwr.supernode.cli import flwr_clientapp as main\n"
        "sys.argv[0] = 'flwr-clientapp'\n"
        "sys.exit(main())\n"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fedmkt.federation.flower.clientapp_server SOCKET", file=sys.stderr)
        return 2
    serve(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
