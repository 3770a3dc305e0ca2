"""Lightning callbacks for FedMKT's distillation phase (installed as `fedmkt.callbacks`).

They run, in this order, in `setup` of a receiver's distillation `Trainer`, before its
dataloader is built:
1. `SelectiveTransferCallback` — DualMinCE: which public samples to distil, from which teacher;
2. `AlignmentCacheCallback` — maps the chosen teachers' top-k logits onto the receiver's tokens,
   with MinED vocabulary maps built once per tokenizer pair and cached on disk.

A third, `PhaseDeadlineCallback`, bounds how long a client's phase may run, and
`PhaseProgressBar` labels every phase's progress bar with its party, phase and round.
"""

from fedmkt.callbacks.alignment_cache import AlignmentCacheCallback
from fedmkt.callbacks.deadline import PhaseDeadlineCallback, PhaseTimeout
from fedmkt.callbacks.phase_progress import PhaseProgressBar
from fedmkt.callbacks.selective_transfer import SelectiveTransferCallback

__all__ = [
    "AlignmentCacheCallback",
    "PhaseDeadlineCallback",
    "PhaseProgressBar",
    "PhaseTimeout",
    "SelectiveTransferCallback",
]
