"""launch-local's processes do not outlive it: killed outright, its watchdog ends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("flwr")

LAUNCHER = """
import sys, time
from pathlib import Path
from fedmkt.federation.flower.local import LocalFederation

federation = LocalFederation(Path(sys.argv[1]))
child = federation.start("stand_in_supernode", ["sleep", "600"], {"PATH": "/usr/bin:/bin"})
grandchild = federation.start("stand_in_superlink", ["sh", "-c", "sleep 600 & wait"], {"PATH": "/usr/bin:/bin"})
federation.watch()
print(child.pid, grandchild.pid, flush=True)
time.sleep(600)
"""


def _gone(pids, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_a_killed_launcher_takes_its_federation_with_it(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        child, shell = (int(pid) for pid in launcher.stdout.readline().split())
        time.sleep(0.5)
        family = [child, shell, *(p.pid for p in psutil.Process(shell).children(recursive=True))]
        assert len(family) == 3 and all(psutil.pid_exists(pid) for pid in family)
        os.kill(launcher.pid, signal.SIGKILL)  # nothing of the launcher runs after this
        launcher.wait()
        assert _gone(family), "processes of the killed launcher are still running"
    finally:
        launcher.kill()


def test_a_stopped_federation_stops_its_watchdog(tmp_path):
    from fedmkt.federation.flower.local import LocalFederation

    federation = LocalFederation(tmp_path)
    federation.start("stand_in", ["sleep", "600"], {"PATH": "/usr/bin:/bin"})
    federation.watch()
    watchdog = federation.watchdog.pid
    federation.stop(timeout_s=5)
    assert _gone([watchdog], timeout_s=5) and federation.watchdog is None
