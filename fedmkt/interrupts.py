"""SIGTERM and SIGINT as an exception that stops a run where it is.

Lightning installs its own SIGTERM handler while a Trainer runs; with nothing underneath it, that
handler only sets a flag that the fit loop checks, so a SIGTERM during prediction or evaluation
was swallowed and the run went on. With these handlers installed first, Lightning chains to them
and the signal raises `RunInterrupted` in every phase. Any program that drives `fedmkt.run.fit`
(the CLI, `benchmarks/reproduce.py`, a user's script) wraps the run in `stop_on_signals()`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedmkt.errors import RunInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `RunInterrupted` (once); the previous handlers come back after.

    Off the main thread (where Python cannot set handlers) it changes nothing. A second signal
    while the run stops is ignored, so it cannot interrupt the run's own cleanup.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            raise RunInterrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
