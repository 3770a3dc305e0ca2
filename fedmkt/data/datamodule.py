"""Per-party data: the party's private part, the shared public part, and distillation batches.

Every party tokenizes the same public questions with its own tokenizer; sample `i` of the public
set is the same question for everybody, which is what lets payloads refer to samples by index.
The distillation data module starts without targets: the selective-transfer and alignment
callbacks fill in, before its dataloader is built, which samples are distilled and the teacher's
top-k distribution aligned to this party's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from fedmkt.data.tasks import QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.errors import FedMKTError
from fedmkt.selection import Selection


@dataclass
class TokenizedSample:
    """One question → answer sample in a party's own tokens."""

    index: int
    input_ids: torch.Tensor
    targets: torch.Tensor

    def as_item(self) -> dict[str, torch.Tensor | int]:
        return {"index": self.index, "input_ids": self.input_ids, "targets": self.targets}


def tokenize_examples(examples: list[QAExample], tokenizer, max_length: int) -> list[TokenizedSample]:
    """Tokenize prompt + correct answer for training (CE on answer tokens)."""
    samples = []
    for index, example in enumerate(examples):
        input_ids, targets = encode_prompt_answer(tokenizer, example.prompt, example.answer, max_length)
        samples.append(TokenizedSample(index, input_ids, targets))
    return samples


def _loader(items: list[dict], batch_size: int, pad_id: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        items,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        collate_fn=lambda batch: collate(batch, pad_id),
    )


class PartyDataModule(L.LightningDataModule):
    """A party's private training data (`train_dataloader`) and the public set it scores."""

    def __init__(
        self,
        name: str,
        private: list[QAExample],
        public: list[QAExample],
        tokenizer,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        if not public:
            raise FedMKTError("the public dataset is empty. Fix: raise data.pool_size or lower data.eval_size.")
        self.name = name
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.shuffle_seed = seed
        """Seed of the next private epoch's order; the participant sets it per round."""
        self.private = tokenize_examples(private, tokenizer, max_length)
        self.public = tokenize_examples(public, tokenizer, max_length)

    def train_dataloader(self) -> DataLoader:
        if not self.private:
            raise FedMKTError(f"{self.name} has no private data. Fix: raise data.pool_size or use fewer clients.")
        return _loader([s.as_item() for s in self.private], self.batch_size, self.pad_id, True, self.shuffle_seed)

    def predict_dataloader(self) -> DataLoader:
        return _loader([s.as_item() for s in self.public], self.eval_batch_size, self.pad_id, False, self.seed)


@dataclass
class DistillationTargets:
    """Teacher targets aligned to one receiver's tokens, per public sample (None: not distilled)."""

    ids: list[Optional[torch.Tensor]] = field(default_factory=list)
    probs: list[Optional[torch.Tensor]] = field(default_factory=list)


class DistillationDataModule(L.LightningDataModule):
    """Public samples for one receiver's distillation phase.

    `selection` (set by `SelectiveTransferCallback`) says which samples are distilled and from
    which teacher; `targets` (set by `AlignmentCacheCallback`) holds the aligned top-k targets.
    Unselected samples still train with the task CE and contribute no KD term.
    """

    def __init__(
        self,
        receiver: str,
        public: list[TokenizedSample],
        teacher_payloads: dict,
        own_losses: torch.Tensor,
        batch_size: int,
        pad_id: int,
        seed: int,
        top_k: int,
        kd_positions: str = "all",
    ) -> None:
        super().__init__()
        self.receiver = receiver
        self.public = public
        self.teacher_payloads = teacher_payloads
        self.own_losses = own_losses
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.top_k = top_k
        self.kd_positions = kd_positions
        self.selection: Optional[Selection] = None
        self.targets: Optional[DistillationTargets] = None

    def _item(self, sample: TokenizedSample) -> dict:
        item = sample.as_item()
        length = len(sample.input_ids)
        # Positions that would be distilled if DualMinCE selected the sample: the KD term's
        # denominator (see fedmkt.losses.kd_objective), so it does not depend on the selection.
        eligible = torch.ones(length, dtype=torch.bool)
        eligible[-1] = False  # the last position has no next token to predict
        if self.kd_positions == "answer":
            eligible &= sample.targets != IGNORE_INDEX
        item["kd_eligible"] = eligible
        ids = self.targets.ids[sample.index] if self.targets else None
        if ids is None:
            item["kd_ids"] = torch.full((length, self.top_k), -1, dtype=torch.long)
            item["kd_probs"] = torch.zeros(length, self.top_k)
            item["kd_mask"] = torch.zeros(length, dtype=torch.bool)
            return item
        probs = self.targets.probs[sample.index]
        width = ids.shape[1]
        if width < self.top_k:  # pad slots so every teacher's targets stack
            ids = torch.cat([ids, ids.new_full((length, self.top_k - width), -1)], dim=1)
            probs = torch.cat([probs, probs.new_zeros(length, self.top_k - width)], dim=1)
        mask = (ids >= 0).any(dim=1) & eligible
        item.update(kd_ids=ids[:, : self.top_k], kd_probs=probs[:, : self.top_k], kd_mask=mask)
        return item

    def train_dataloader(self) -> DataLoader:
        if self.selection is None:
            raise RuntimeError("DistillationDataModule needs SelectiveTransferCallback to run before its dataloader")
        items = [self._item(sample) for sample in self.public]
        return _loader(items, self.batch_size, self.pad_id, True, self.seed)
