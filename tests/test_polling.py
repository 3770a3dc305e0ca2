"""A local SuperNode and SuperExec ask for work every fraction of a second, not every 3 s and 1 s."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr")

from fedmkt.federation.flower import polling  # noqa: E402


def test_the_supernode_loop_waits_at_most_the_poll_period(monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)  # as Flower imports it
    polling.install()
    polling.install()  # twice: still one shim
    started = time.monotonic()
    start_client_internal.time.sleep(3)  # Flower's wait after an empty pull
    waited = time.monotonic() - started
    assert polling.POLL_S * 0.9 <= waited < 1.0
    assert abs(start_client_internal.time.time() - time.time()) < 1.0  # the rest of `time` is untouched


def test_the_superexec_polls_every_poll_period_unless_told_otherwise():
    assert polling.superexec_env({"PATH": "/bin"}) == {"PATH": "/bin", polling.SUPEREXEC_POLL_ENV: "0.2"}
    assert polling.superexec_env({polling.SUPEREXEC_POLL_ENV: "5"})[polling.SUPEREXEC_POLL_ENV] == "5"
