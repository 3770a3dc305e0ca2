"""Lightning callbacks of fedmkt's phases (installed as `fedmkt.callbacks`).

Every phase's `Trainer` gets `PhaseProgressBar`, which labels its bar with party, phase and
round (or, where the output is not a terminal, `PhaseLines`: the same as plain lines), and `PhaseDeadlineCallback` when a client's phase has a time limit. A distillation phase
also gets `SelectiveTransferCallback` and `AlignmentCacheCallback`, which log its selection counts
and how it used the alignment cache. What a distillation phase trains on is decided before its
`Trainer` starts (`fedmkt.teacher_targets`); no callback changes it.
"""

from fedmkt.callbacks.alignment_cache import AlignmentCacheCallback
from fedmkt.callbacks.deadline import PhaseDeadlineCallback, PhaseTimeout
from fedmkt.callbacks.phase_progress import PhaseLines, PhaseProgressBar
from fedmkt.callbacks.selective_transfer import SelectiveTransferCallback

__all__ = [
    "AlignmentCacheCallback",
    "PhaseDeadlineCallback",
    "PhaseLines",
    "PhaseProgressBar",
    "PhaseTimeout",
    "SelectiveTransferCallback",
]
