"""Prompt + answer tokenisation: targets cover the answer only, truncation keeps the answer and BOS."""

from __future__ import annotations

import pytest
import torch

from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.errors import FedMKTError

PROMPT = "Question: Which technology was developed most recently?\nAnswer:"
ANSWER = " cellular telephone"


class WordTokenizer:
    """A stand-in with a BOS (and optionally an appended EOS), like Gemma's / Llama-2's tokenizers."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, append_eos: bool = False) -> None:
        self.vocab: dict[str, int] = {}
        self.append_eos = append_eos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.vocab.setdefault(word, 10 + len(self.vocab)) for word in text.split()]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids + ([self.eos_token_id] if self.append_eos else [])
        return {"input_ids": ids}


def test_answer_tokens_alone_are_targets_shifted_by_one(smollm2_tokenizer):
    input_ids, targets = encode_prompt_answer(smollm2_tokenizer, PROMPT, ANSWER, max_length=512)
    prompt_ids = smollm2_tokenizer(PROMPT)["input_ids"]
    answer_ids = smollm2_tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert input_ids.dtype == targets.dtype == torch.long
    assert input_ids.tolist() == prompt_ids + answer_ids
    # Same ids as tokenizing the running text: the answer's leading space stays with the answer.
    assert input_ids.tolist() == smollm2_tokenizer(PROMPT + ANSWER)["input_ids"]
    p = len(prompt_ids)
    assert (targets[: p - 1] == IGNORE_INDEX).all()
    assert targets[p - 1 : -1].tolist() == answer_ids
    assert targets[-1] == IGNORE_INDEX
    assert (targets != IGNORE_INDEX).sum() == len(answer_ids)


def test_long_prompt_is_cut_from_the_left_so_the_answer_survives(smollm2_tokenizer):
    long_prompt = "filler words " * 200 + PROMPT
    answer_ids = smollm2_tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    input_ids, targets = encode_prompt_answer(smollm2_tokenizer, long_prompt, ANSWER, max_length=24)
    assert len(input_ids) == len(targets) == 24
    assert input_ids[-len(answer_ids) :].tolist() == answer_ids
    assert targets[-len(answer_ids) - 1 : -1].tolist() == answer_ids
    # What is kept of the prompt is its end, right before the answer.
    full_prompt = smollm2_tokenizer(long_prompt)["input_ids"]
    assert input_ids[: 24 - len(answer_ids)].tolist() == full_prompt[-(24 - len(answer_ids)) :]


def test_truncation_keeps_a_leading_bos_and_drops_an_appended_eos():
    tokenizer = WordTokenizer(append_eos=True)
    input_ids, targets = encode_prompt_answer(tokenizer, "a b c d e f g", "x y", max_length=5)
    a, b, c, d, e, f, g, x, y = range(10, 19)
    assert input_ids.tolist() == [1, f, g, x, y]
    assert targets.tolist() == [IGNORE_INDEX, IGNORE_INDEX, x, y, IGNORE_INDEX]
    # Untruncated: BOS + prompt + answer, no EOS in the middle of the text.
    input_ids, _ = encode_prompt_answer(tokenizer, "a b", "x y", max_length=64)
    assert input_ids.tolist() == [1, a, b, x, y]


def test_an_answer_that_cannot_fit_is_a_user_error(smollm2_tokenizer):
    with pytest.raises(FedMKTError, match="max_length=2.*raise max_length"):
        encode_prompt_answer(smollm2_tokenizer, PROMPT, ANSWER, max_length=2)
    with pytest.raises(FedMKTError, match="no room"):
        encode_prompt_answer(WordTokenizer(), "a b", "x y", max_length=2)
    # BOS alone is enough context to predict the answer's first token.
    input_ids, targets = encode_prompt_answer(WordTokenizer(), "a b", "x y", max_length=3)
    assert input_ids.tolist() == [1, 12, 13] and targets.tolist() == [12, 13, IGNORE_INDEX]
    with pytest.raises(FedMKTError, match="zero tokens"):
        encode_prompt_answer(smollm2_tokenizer, PROMPT, "", max_length=64)
    # Exactly enough room: one prompt token, then the answer.
    input_ids, targets = encode_prompt_answer(smollm2_tokenizer, PROMPT, ANSWER, max_length=3)
    assert len(input_ids) == 3 and (targets != IGNORE_INDEX).sum() == 2


def test_collate_right_pads_and_stacks():
    batch = [
        {
            "index": 4,
            "input_ids": torch.tensor([5, 6, 7]),
            "targets": torch.tensor([-100, 7, -100]),
            "kd_probs": torch.ones(3, 2),
            "uid": "a",
        },
        {
            "index": 9,
            "input_ids": torch.tensor([8]),
            "targets": torch.tensor([-100]),
            "kd_probs": torch.ones(1, 2),
            "uid": "b",
        },
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["targets"].tolist() == [[-100, 7, -100], [-100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["index"].tolist() == [4, 9]
    assert out["kd_probs"].shape == (2, 3, 2) and out["kd_probs"][1, 1:].abs().sum() == 0
    assert out["uid"] == ["a", "b"]


def test_collate_keeps_dtypes_and_pads_ids_with_the_pad_token():
    batch = [
        {
            "input_ids": torch.tensor([1, 2]),
            "targets": torch.tensor([2, -100]),
            "mask": torch.tensor([True, True]),
            "weight": torch.tensor(0.5),
        },
        {
            "input_ids": torch.tensor([3, 4, 5, 6]),
            "targets": torch.tensor([4, 5, 6, -100]),
            "mask": torch.tensor([True, False, True, True]),
            "weight": torch.tensor(2.0),
        },
    ]
    out = collate(batch, pad_id=49152)
    assert out["input_ids"][0].tolist() == [1, 2, 49152, 49152]
    assert out["mask"].dtype == torch.bool and out["mask"][0].tolist() == [True, True, False, False]
    assert out["weight"].tolist() == [0.5, 2.0]
