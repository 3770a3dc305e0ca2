"""One phase over several clients, with the span each client spent in it.

The round protocol runs each client stage (fine-tune, share, distill, evaluate, save) through a
`StageRunner`, so the backend decides how clients run: in-process one after the other, on Flower
all at once (one message per client, replies collected as they come). Either way every client's
outcome is kept apart, so one failing client is left out without stopping the others, and the
span it spent becomes an entry of its round `timeline` in summary.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

PHASES = ("fine_tune", "share_knowledge", "distill", "evaluate", "save_adapter")
"""The phase names a `timeline` entry may carry."""


@dataclass
class Outcome:
    """What one client's call of a phase returned or raised, and when it ran (Unix seconds)."""

    value: Any = None
    error: Optional[Exception] = None
    start: float = 0.0
    end: float = 0.0
    followed: dict[str, Outcome] = field(default_factory=dict)
    """Backends that run several phases per call: the outcomes of the phases that ran right after."""
    sent: Optional[float] = None
    """Backends that message the client: when the server sent the message that started this phase."""

    def span(self, phase: str) -> dict:
        """This call as a `timeline` entry."""
        span = {"phase": phase, "start": self.start, "end": self.end}
        return span if self.sent is None else span | {"sent": self.sent}


StageRunner = Callable[[str, Sequence[tuple[Any, tuple]]], dict[str, Outcome]]
"""`runner(phase, [(client, args), ...])` → client name → `Outcome` of `client.<phase>(*args)`."""


def run_one_by_one(phase: str, calls: Sequence[tuple[Any, tuple]]) -> dict[str, Outcome]:
    """The in-process runner: each client in turn, in this process.

    Only `Exception`s become a client's failure; an interrupt (`BaseException`) stops the run.
    """
    outcomes = {}
    for client, args in calls:
        outcome = Outcome(start=time.time())
        try:
            outcome.value = getattr(client, phase)(*args)
        except Exception as error:  # a failing client must not stop the federation
            outcome.error = error
        outcome.end = time.time()
        outcomes[client.name] = outcome
    return outcomes
