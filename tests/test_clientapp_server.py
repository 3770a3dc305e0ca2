"""A node's ClientApp processes forked from one that imported the ClientApp once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmkt.federation.flower.clientapp_server import relay

SERVER = """
import os, random, sys, time
from fedmkt.federation.flower import clientapp_server

def main():
    if "--sleep" in sys.argv:
        time.sleep(60)
    print("ran", sys.argv[1:], os.environ.get("PROBE"), os.getcwd(), random.random(), os.getppid(), flush=True)
    sys.exit(3)

clientapp_server.serve(sys.argv[1], main)
"""

LAUNCHER = "import sys\nfrom fedmkt.federation.flower.clientapp_server import relay\nsys.exit(relay(sys.argv[1], sys.argv[1:]))\n"


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "socket"
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], stdout=subprocess.PIPE, text=True)
    assert "listening" in process.stdout.readline()
    yield path, process
    process.kill()
    process.wait()


def _launch(path: Path, tmp_path: Path, *arguments: str, env: dict | None = None) -> subprocess.Popen:
    out = open(tmp_path / f"out_{time.monotonic_ns()}.txt", "w+")
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(path), *arguments],
        cwd=tmp_path,
        env=dict(os.environ, PROBE="from the launcher", **(env or {})),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    process.out = out  # type: ignore[attr-defined]
    return process


def test_a_child_runs_with_the_launchers_arguments_environment_folder_and_streams(server, tmp_path):
    path, process = server
    runs = [_launch(path, tmp_path, "--token", "abc") for _ in range(2)]
    said = []
    for run in runs:
        assert run.wait(timeout=60) == 3  # the child's exit status
        run.out.seek(0)
        said.append(run.out.read().split())
    for words in said:
        assert words[:4] == ["ran", "['--token',", "'abc']", "from"] and str(tmp_path) in words
        assert int(words[-1]) == process.pid  # forked by the server, not started afresh
    assert said[0][-2] != said[1][-2]  # each child reseeds random


def test_a_signal_to_the_launcher_reaches_the_child(server, tmp_path):
    path, _ = server
    run = _launch(path, tmp_path, "--sleep")
    time.sleep(1.5)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 128 + signal.SIGTERM


def test_without_a_server_the_launcher_runs_the_clientapp_itself(tmp_path):
    assert relay(str(tmp_path / "nobody"), ["flwr-clientapp"]) is None
