"""Lightning callbacks that every phase's `Trainer` gets (installed as `fedmkt.callbacks`).

`PhaseDeadlineCallback` bounds how long a client's phase may run, and `PhaseProgressBar` labels
every phase's progress bar with its party, phase and round. What a distillation phase trains on
is decided before its `Trainer` starts (`fedmkt.distillation`), not in callback hooks.
"""

from fedmkt.callbacks.deadline import PhaseDeadlineCallback, PhaseTimeout
from fedmkt.callbacks.phase_progress import PhaseProgressBar

__all__ = ["PhaseDeadlineCallback", "PhaseProgressBar", "PhaseTimeout"]
