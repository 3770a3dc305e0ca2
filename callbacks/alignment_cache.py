"""Token alignment (MinED vocabulary maps + sequence alignment) as a Lightning callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from fedmkt.alignment import TokenAligner
from fedmkt.data.datamodule import DistillationDataModule, DistillationTargets


class AlignmentCacheCallback(L.Callback):
    """Aligns the selected teachers' top-k logits to the receiver's tokenizer.

    Vocabulary maps are built once per (teacher, receiver) tokenizer pair: on disk under
    `cache_dir`, keyed by tokenizer content (so they are reused across runs and renamed models),
    and in memory across rounds. Only selected samples are aligned.
    """

    def __init__(
        self,
        receiver_tokenizer,
        teacher_tokenizers: dict,
        cache_dir: str | Path,
        temperature: float = 1.0,
        sequence_alignment: str = "offsets",
    ) -> None:
        self.receiver_tokenizer = receiver_tokenizer
        self.sequence_alignment = sequence_alignment
        self.teacher_tokenizers = teacher_tokenizers
        self.cache_dir = Path(cache_dir)
        self.temperature = temperature
        self._aligners: dict[str, TokenAligner] = {}

    def aligner(self, teacher: str) -> TokenAligner:
        """The (cached) aligner from `teacher`'s tokenizer to the receiver's."""
        if teacher not in self._aligners:
            self._aligners[teacher] = TokenAligner(
                self.teacher_tokenizers[teacher], self.receiver_tokenizer, self.cache_dir, self.sequence_alignment
            )
        return self._aligners[teacher]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        if not isinstance(data, DistillationDataModule) or data.selection is None:
            return
        targets = DistillationTargets(ids=[None] * len(data.public), probs=[None] * len(data.public))
        for teacher_index, teacher in enumerate(data.selection.teachers):
            chosen = (data.selection.teacher_of_sample == teacher_index).nonzero().flatten().tolist()
            if not chosen:
                continue
            payload = data.teacher_payloads[teacher]
            row_of_sample = {int(s): row for row, s in enumerate(payload.sample_index.tolist())}
            rows = [payload.sample(row_of_sample[i]) for i in chosen]
            aligned = self.aligner(teacher).align(
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [data.public[i].input_ids for i in chosen],
                temperature=self.temperature,
            )
            for i, (ids, probs) in zip(chosen, aligned):
                targets.ids[i], targets.probs[i] = ids.long(), probs.float()
        data.targets = targets
