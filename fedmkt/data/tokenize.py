"""Tokenising prompt + answer into next-token targets, and padding such samples into a batch.

Training (CE on the answer) and evaluation (log-likelihood of each answer option) both go through
`encode_prompt_answer`, so a model is scored on exactly the token sequences it was trained on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedmkt.errors import FedMKTError

__all__ = ["IGNORE_INDEX", "encode_prompt_answer", "prompt_ids", "prompt_token_ids", "collate"]

IGNORE_INDEX = -100
"""Target value that `torch.nn.functional.cross_entropy` skips (prompt and padding positions)."""


def prompt_ids(tokenizer: Any, prompt: str) -> tuple[list[int], int]:
    """The prompt's ids with the tokenizer's leading special tokens (e.g. `<bos>`), and how many lead.

    Trailing special tokens (an `</s>` some tokenizers append) are dropped: the answer follows the
    prompt directly, as in one running text.
    """
    plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    for lead in range(len(full) - len(plain) + 1):
        if full[lead : lead + len(plain)] == plain:
            return full[:lead] + plain, lead
    return full, 0  # specials changed the tokenisation itself; keep the tokenizer's own output


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``prompt``'s ids exactly as a run's samples begin (leading special tokens, no trailing ones)."""
    return prompt_ids(tokenizer, prompt)[0]


def encode_prompt_answer(
    tokenizer: Any, prompt: str, answer: str, max_length: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(input_ids [L], targets [L])` for `prompt` followed by `answer`.

    `targets[i]` is `input_ids[i + 1]` where that next token belongs to the answer and -100 elsewhere,
    so cross-entropy of `logits` against `targets` is the loss on the answer tokens only (the
    shift is done here, once, rather than in every loss). An over-long sample loses prompt tokens
    from the left, after any leading BOS, so the answer and the text right before it survive.
    """
    context, lead = prompt_ids(tokenizer, prompt)
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not answer_ids:
        raise FedMKTError(f"Answer {answer!r} tokenizes to zero tokens. Fix: drop examples with an empty answer.")
    context_room = max_length - len(answer_ids)
    if context_room < max(lead, 1):
        raise FedMKTError(
            f"Answer is {len(answer_ids)} tokens, which leaves no room for the prompt within "
            f"max_length={max_length}. Fix: raise max_length or shorten the answer."
        )
    if len(context) > context_room:
        context = context[:lead] + context[len(context) - (context_room - lead) :]
    input_ids = torch.tensor(context + answer_ids, dtype=torch.long)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    start = len(context)  # first answer position; position start - 1 predicts it
    targets[start - 1 : -1] = input_ids[start:]
    return input_ids, targets


# Padding value per key (None: the tokenizer's pad id); unlisted keys pad with 0 / False.
# `kd_ids` pads with -1, the "no token" slot marker the distillation data already uses.
_PAD_VALUES = {"input_ids": None, "targets": IGNORE_INDEX, "labels": IGNORE_INDEX, "attention_mask": 0, "kd_ids": -1}


def collate(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad the samples of `batch` into one dict of tensors, adding `attention_mask`.

    `input_ids` pad with `pad_id`, `targets`/`labels` with -100 (ignored by the loss), `kd_ids` with
    -1, other 1-D+ tensors with 0; 0-D tensors and Python numbers (e.g. `index`) are stacked. Non-tensor values
    (e.g. a uid string) are passed through as lists.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    lengths = torch.tensor([len(sample["input_ids"]) for sample in batch], dtype=torch.long)
    longest = int(lengths.max())
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], Tensor) and values[0].dim() >= 1:
            pad = _PAD_VALUES.get(key, 0)
            pad = pad_id if pad is None else pad
            # Pad every dim (dim 0 is the sequence) to the batch's largest size in that dim.
            shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
            stacked = values[0].new_full((len(values), *shape), pad)
            for row, value in enumerate(values):
                stacked[(row, *(slice(0, s) for s in value.shape))] = value
            out[key] = stacked
        elif isinstance(values[0], Tensor) or isinstance(values[0], (int, float, bool)):
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            out[key] = values
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return out
