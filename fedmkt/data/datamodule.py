"""Per-party data: the party's private part, the shared public part, and distillation batches.

Every party tokenizes the same public questions with its own tokenizer; sample `i` of the public
set is the same question for everybody, which is what lets payloads refer to samples by index.
The distillation data module is built from targets already selected and aligned
(`fedmkt.teacher_targets`) and holds its final items from construction on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from fedmkt.data.tasks import QAExample
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.dp import DPPlan, poisson_batches
from fedmkt.errors import FedMKTError
from fedmkt.fastpaths import FAST


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
        self.dp_plan: Optional[DPPlan] = None
        """Under `privacy.dp`, the private epoch is Poisson-sampled batches (`fedmkt.dp`); the participant sets it."""
        self.private = tokenize_examples(private, tokenizer, max_length)
        self.public_examples = public
        """The public questions as text: what a teacher's tokens are checked against (`fedmkt.received`)."""
        labelled = all(example.labelled for example in public)
        self.public = tokenize_examples(public, tokenizer, max_length) if labelled else []
        """The public samples with their gold answers (empty for an unlabelled public set)."""
        self.scored: Optional[list[TokenizedSample]] = None
        """What the next predict scores, when not `public`: the public questions with this party's own answers."""

    def train_dataloader(self) -> DataLoader:
        if not self.private:
            raise FedMKTError(f"{self.name} has no private data. Fix: raise data.pool_size or use fewer clients.")
        items = [s.as_item() for s in self.private]
        if self.dp_plan is not None:  # each sample drawn with probability q per step; a batch may be empty
            pad_id = self.pad_id
            return DataLoader(
                items,
                batch_sampler=poisson_batches(len(items), self.dp_plan),
                collate_fn=lambda batch: collate(batch, pad_id) if batch else {},
            )
        return _loader(items, self.batch_size, self.pad_id, True, self.shuffle_seed)

    def predict_dataloader(self) -> DataLoader:
        """The public set longest first, so each batch holds samples of similar length (little padding).

        Predictions carry each sample's index; the payload puts them back in sample order.
        """
        samples = self.public if self.scored is None else self.scored
        if FAST.sorted_public:
            order = sorted(samples, key=lambda sample: (-len(sample.input_ids), sample.index))
        else:
            order = samples
        return _loader([s.as_item() for s in order], self.eval_batch_size, self.pad_id, False, self.seed)


@dataclass
class DistillationTargets:
    """Teacher targets aligned to one receiver's tokens, per public sample (None: not distilled)."""

    ids: list[Optional[torch.Tensor]] = field(default_factory=list)
    probs: list[Optional[torch.Tensor]] = field(default_factory=list)

    @classmethod
    def empty(cls, num_samples: int) -> DistillationTargets:
        """Targets for `num_samples` samples, none of them distilled."""
        return cls(ids=[None] * num_samples, probs=[None] * num_samples)


class DistillationDataModule(L.LightningDataModule):
    """Public samples for one receiver's distillation phase, with their final KD targets.

    Items are built here, once: a sample with targets is distilled where its aligned rows are
    non-empty; one without (not selected) still trains with the task CE and has no KD term.
    `public` may be a subset of the public set (an unlabelled one: the selected samples, each with
    its teacher's answer); `targets` is indexed by public sample index.
    """

    def __init__(
        self,
        public: list[TokenizedSample],
        targets: DistillationTargets,
        batch_size: int,
        pad_id: int,
        seed: int,
        top_k: int,
        kd_positions: str = "all",
    ) -> None:
        super().__init__()
        if len(targets.ids) != len(targets.probs) or any(sample.index >= len(targets.ids) for sample in public):
            raise ValueError(f"targets for {len(targets.ids)} public samples do not cover the samples given")
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.items: tuple[dict, ...] = tuple(
            _distillation_item(sample, targets.ids[sample.index], targets.probs[sample.index], top_k, kd_positions)
            for sample in public
        )

    def train_dataloader(self) -> DataLoader:
        return _loader(list(self.items), self.batch_size, self.pad_id, True, self.seed)


def _distillation_item(
    sample: TokenizedSample, ids: Optional[torch.Tensor], probs: Optional[torch.Tensor], top_k: int, kd_positions: str
) -> dict:
    """One sample's training item: its tokens plus KD ids, probabilities and masks padded to `top_k` slots."""
    item = sample.as_item()
    length = len(sample.input_ids)
    # Positions that would be distilled if DualMinCE selected the sample: the KD term's
    # denominator (see fedmkt.losses.kd_objective), so it does not depend on the selection.
    eligible = torch.ones(length, dtype=torch.bool)
    eligible[-1] = False  # the last position has no next token to predict
    if kd_positions == "answer":
        eligible &= sample.targets != IGNORE_INDEX
    item["kd_eligible"] = eligible
    if ids is None:
        item["kd_ids"] = torch.full((length, top_k), -1, dtype=torch.long)
        item["kd_probs"] = torch.zeros(length, top_k)
        item["kd_mask"] = torch.zeros(length, dtype=torch.bool)
        return item
    width = ids.shape[1]
    if width < top_k:  # pad slots so every teacher's targets stack
        ids = torch.cat([ids, ids.new_full((length, top_k - width), -1)], dim=1)
        probs = torch.cat([probs, probs.new_zeros(length, top_k - width)], dim=1)
    mask = (ids >= 0).any(dim=1) & eligible
    item.update(kd_ids=ids[:, :top_k], kd_probs=probs[:, :top_k], kd_mask=mask)
    return item
