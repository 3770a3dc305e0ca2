"""How often a local federation's Flower processes ask for work.

Between a server's message and the node's phase, two processes poll: the SuperNode asks the
SuperLink for messages (flwr 1.42 waits a fixed 3 s after an empty answer) and the SuperExec asks
the SuperNode for tasks (1 s, `FLWR_SUPEREXEC_TASK_POLL_INTERVAL`). On one machine, where an ask
costs a loopback request, both wait `POLL_S` instead (`benchmarks/flower_overhead.py` measures the
message-to-phase latency). The SuperNode's wait is a constant inside Flower's loop, so `install()`
gives that module a `time` whose `sleep` waits at most `POLL_S` (an internal of flwr 1.42; on a
Flower without it nothing changes).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

POLL_S = 0.2
"""Seconds a local SuperNode or SuperExec waits before it asks again."""

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class _ShortSleeps:
    """The `time` module, with sleeps cut to `POLL_S`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def install() -> None:
    """In a `flower-supernode` process, before it starts: its polling loop waits at most `POLL_S`."""
    try:
        module = importlib.import_module("flwr.supernode.start_client_internal")
    except ImportError:
        return
    if getattr(module, "time", None) is time:
        module.time = _ShortSleeps()


def superexec_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a local SuperExec: it asks for tasks every `POLL_S` unless the caller chose otherwise."""
    return {SUPEREXEC_POLL_ENV: str(POLL_S), **env}
