"""A watchdog that ends a local federation's processes when the command that started them dies.

`fedmkt launch-local` starts a SuperLink and SuperNodes, each in its own session (so Ctrl-C reaches
fedmkt first); Flower's own processes and fedmkt's node workers run below them. If the launcher is
killed outright (SIGKILL, an OOM kill) nothing of it runs to stop them, and they would serve the
next launch's nodes from the same folders. This small process watches the launcher and, the moment
it is gone, ends every process it started and everything below them.

    python -m fedmkt.federation.flower.watchdog LAUNCHER_PID PID [PID ...]
"""

from __future__ import annotations

import signal
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL."""


def end_tree(roots: list[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM `roots` and everything below them (found before any is signalled), then SIGKILL what is left."""
    family: list[psutil.Process] = []
    for pid in roots:
        try:
            root = psutil.Process(pid)
            family += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    for process in family:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def watch(launcher: int, roots: list[int]) -> None:
    """Wait while `launcher` lives; then end `roots` and their descendants."""
    try:
        parent = psutil.Process(launcher)
        while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
            time.sleep(POLL_S)
    except psutil.Error:
        pass
    end_tree(roots)


def main(argv: list[str]) -> None:
    launcher, *roots = (int(value) for value in argv)
    watch(launcher, roots)


if __name__ == "__main__":
    main(sys.argv[1:])
