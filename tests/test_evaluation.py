"""Multiple-choice evaluation equals a slow per-choice reference, and scores what it should."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedmkt.data.tasks import QAExample, load_task
from fedmkt.data.tokenize import encode_prompt_answer, prompt_ids
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import (
    choice_loglikelihoods,
    evaluate_multiple_choice,
    generate_greedy,
    rouge_l,
    wilson_interval,
)
from fedmkt.fastpaths import plain


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mixed_examples() -> list[QAExample]:
    """Real rows of different shapes: ARC (4-5 choices, short), BoolQ (long passage), RTE."""
    return load_task("arc_easy")[:4] + load_task("boolq")[:2] + load_task("rte")[:1]


def reference_loglikelihood(model, tokenizer, prompt: str, choice: str, max_length: int) -> float:
    """One unpadded forward per (prompt, choice), straight from the definition."""
    input_ids, targets = encode_prompt_answer(tokenizer, prompt, choice, max_length)
    with torch.no_grad():
        logits = model(input_ids=input_ids[None]).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for position, target in enumerate(targets.tolist()):
        if target != -100:
            total += float(logprobs[position, target])
    return total


@pytest.mark.parametrize("share_prompt", [True, False])
def test_batched_scores_equal_a_per_choice_reference(tiny_llama, smollm2_tokenizer, mixed_examples, share_prompt):
    batched = choice_loglikelihoods(
        tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=3, max_length=256, share_prompt=share_prompt
    )
    for example, scores in zip(mixed_examples, batched):
        assert scores.shape == (len(example.choices),)
        expected = [
            reference_loglikelihood(tiny_llama, smollm2_tokenizer, example.prompt, c, 256) for c in example.choices
        ]
        torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
        assert int(scores.argmax()) == max(range(len(expected)), key=expected.__getitem__)


def _tiny(arch: str, vocab_size: int):
    import transformers as T

    configs = {
        "gpt2": (
            T.GPT2Config,
            T.GPT2LMHeadModel,
            dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0),
        ),
        "opt": (
            T.OPTConfig,
            T.OPTForCausalLM,
            dict(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=256,
            ),
        ),
        "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=64, n_layer=2, n_head=4)),
        # A sliding window shorter than the BoolQ prompts, as Gemma-3's local layers have.
        "gemma3": (
            T.Gemma3TextConfig,
            T.Gemma3ForCausalLM,
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=16,
            ),
        ),
        "qwen2": (
            T.Qwen2Config,
            T.Qwen2ForCausalLM,
            dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
            ),
        ),
    }
    config_class, model_class, kwargs = configs[arch]
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=vocab_size, **kwargs)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom", "gemma3", "qwen2"])
def test_shared_prompt_scoring_is_exact_across_architectures(arch, smollm2_tokenizer, mixed_examples):
    """Learned, rotary and ALiBi positions, sliding windows: the cached prompt must not change a score."""
    model = _tiny(arch, len(smollm2_tokenizer))
    examples = mixed_examples[:2] + mixed_examples[4:]
    shared = choice_loglikelihoods(model, smollm2_tokenizer, examples, batch_size=5, max_length=96)
    alone = choice_loglikelihoods(model, smollm2_tokenizer, examples, batch_size=1, max_length=96, share_prompt=False)
    for a, b in zip(shared, alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_shared_prompt_runs_each_prompt_once(tiny_llama, smollm2_tokenizer, mixed_examples):
    tokens = {True: 0, False: 0}
    for share in tokens:
        hook = tiny_llama.model.embed_tokens.register_forward_hook(
            lambda m, i, o, share=share: tokens.__setitem__(share, tokens[share] + i[0].numel())
        )
        try:
            choice_loglikelihoods(tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=64, share_prompt=share)
        finally:
            hook.remove()
    assert tokens[True] < 0.6 * tokens[False]


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward does not know `logits_to_keep` (older or custom models)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_logits_to_keep_score_the_same(tiny_llama, smollm2_tokenizer, mixed_examples):
    fast = choice_loglikelihoods(tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=4)
    plain = choice_loglikelihoods(NoLogitsToKeep(tiny_llama), smollm2_tokenizer, mixed_examples, batch_size=4)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_only_answer_positions_reach_the_lm_head(tiny_llama, smollm2_tokenizer, mixed_examples):
    """At a 262k vocabulary, full [B, L, V] logits of long BoolQ passages would be gigabytes."""
    seen: list[tuple[int, int]] = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1])))
    try:
        choice_loglikelihoods(tiny_llama, smollm2_tokenizer, load_task("boolq")[:2], batch_size=4)
    finally:
        hook.remove()
    assert seen and all(kept <= 2 for _, kept in seen)  # " no" / " yes": one token each


def test_peft_wrapped_model_is_scored_and_training_mode_restored(tiny_llama, smollm2_tokenizer, mixed_examples):
    peft = pytest.importorskip("peft")
    import copy

    wrapped = peft.get_peft_model(
        copy.deepcopy(tiny_llama), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    wrapped.train()
    # A fresh LoRA adapter (B = 0) leaves the base model's function unchanged.
    base = choice_loglikelihoods(tiny_llama, smollm2_tokenizer, mixed_examples[:3])
    lora = choice_loglikelihoods(wrapped, smollm2_tokenizer, mixed_examples[:3])
    for a, b in zip(base, lora):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert wrapped.training
    metrics = evaluate_multiple_choice(wrapped, smollm2_tokenizer, mixed_examples[:3])
    assert set(metrics) == {"acc", "acc_norm", "n", "acc_ci", "correct"} and 0.0 <= metrics["acc"] <= 1.0
    # One "1"/"0" per question, agreeing with the argmax of the log-likelihoods computed above.
    expected = "".join("1" if int(s.argmax()) == e.answer_index else "0" for s, e in zip(lora, mixed_examples[:3]))
    assert metrics["correct"] == expected and metrics["acc"] == pytest.approx(expected.count("1") / 3)
    assert wrapped.training


class CraftedLM(nn.Module):
    """Logits that favour a fixed set of token ids everywhere (uniform when the set is empty)."""

    def __init__(self, vocab_size: int, favoured: set[int]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[list(favoured)] = 8.0

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
        logits = self.bias.expand(*input_ids.shape, -1)
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_a_model_that_prefers_the_right_answers_scores_one(smollm2_tokenizer, mixed_examples):
    favoured = {
        token for e in mixed_examples for token in smollm2_tokenizer(e.answer, add_special_tokens=False)["input_ids"]
    }

    # Keep only examples where no wrong option is spelled entirely with favoured tokens.
    def clean(example: QAExample) -> bool:
        return all(
            not set(smollm2_tokenizer(c, add_special_tokens=False)["input_ids"]) <= favoured
            for i, c in enumerate(example.choices)
            if i != example.answer_index
        )

    examples = [e for e in mixed_examples if clean(e)]
    assert len(examples) >= 4
    model = CraftedLM(len(smollm2_tokenizer), favoured)
    scores = evaluate_multiple_choice(model, smollm2_tokenizer, examples, batch_size=5)
    assert (scores["acc"], scores["acc_norm"], scores["n"]) == (1.0, 1.0, len(examples))
    # The same model on answers it does not favour gets every question wrong.
    flipped = [QAExample(e.uid, e.prompt, e.choices, (e.answer_index + 1) % len(e.choices)) for e in examples]
    assert evaluate_multiple_choice(model, smollm2_tokenizer, flipped)["acc"] == 0.0


def test_acc_norm_divides_by_characters(smollm2_tokenizer):
    short, long = " a", " internationalization"
    n_short = len(smollm2_tokenizer(short, add_special_tokens=False)["input_ids"])
    n_long = len(smollm2_tokenizer(long, add_special_tokens=False)["input_ids"])
    assert n_short < n_long < len(long) / len(short) * n_short
    # Uniform logits: log-likelihood is -tokens·log V, so raw acc prefers the option with fewer
    # tokens while acc_norm prefers the one with fewer tokens per character.
    model = CraftedLM(len(smollm2_tokenizer), set())
    example = QAExample("x", "Question: Which word?\nAnswer:", (short, long), answer_index=1)
    scores = evaluate_multiple_choice(model, smollm2_tokenizer, [example])
    assert (scores["acc"], scores["acc_norm"], scores["n"]) == (0.0, 1.0, 1)


def test_accuracy_is_a_mean_over_examples(smollm2_tokenizer):
    model = CraftedLM(len(smollm2_tokenizer), set())
    right = QAExample("r", "Question: ?\nAnswer:", (" a", " internationalization"), 0)
    wrong = QAExample("w", "Question: ?\nAnswer:", (" a", " internationalization"), 1)
    metrics = evaluate_multiple_choice(model, smollm2_tokenizer, [right, wrong, wrong, wrong])
    assert (metrics["acc"], metrics["acc_norm"], metrics["n"]) == (0.25, 0.75, 4)


def test_no_examples_is_a_user_error(tiny_llama, smollm2_tokenizer):
    with pytest.raises(FedMKTError, match="No examples"):
        evaluate_multiple_choice(tiny_llama, smollm2_tokenizer, [])


def test_wilson_interval_matches_the_closed_form_values():
    # Reference values of the 95 % Wilson score interval (Newcombe 1998, table I: 81/263; 15/148; 0/20).
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=5e-4)


def test_accuracy_comes_with_its_sample_size_and_interval(tiny_llama, smollm2_tokenizer, mixed_examples):
    metrics = evaluate_multiple_choice(tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=4)
    assert metrics["n"] == len(mixed_examples)
    low, high = metrics["acc_ci"]
    assert low <= metrics["acc"] <= high and 0.0 <= low < high <= 1.0


def test_rouge_l():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dog"], ["the cat sat"]) == pytest.approx(0.0)
    # LCS "the cat sat" (3) of 3 predicted and 4 reference words: F = 2·1·0.75 / 1.75.
    assert rouge_l(["the cat sat", "x"], ["the cat sat down", "x"]) == pytest.approx((6 / 7 + 1) / 2, abs=1e-4)
    with pytest.raises(FedMKTError, match="one per reference"):
        rouge_l(["a"], ["a", "b"])


def _generate_then_cut(model, tokenizer, prompts, max_new_tokens):
    """The answers as decoding every token up to the limit and cutting at the newline afterwards would give."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)[0]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        texts.append(text.split("\n", 1)[0].strip())
    return texts


def test_generation_stops_each_sequence_at_its_newline_with_the_same_answers(tiny_llama, smollm2_tokenizer):
    prompts = ["Question: What colour is the sky?\nAnswer:", "Q: Name a fruit.\nA:", "Hello"]
    expected = _generate_then_cut(tiny_llama, smollm2_tokenizer, prompts, 12)
    assert generate_greedy(tiny_llama, smollm2_tokenizer, prompts, batch_size=2, max_new_tokens=12) == expected


def test_generation_ends_once_every_sequence_has_its_line(tiny_llama, smollm2_tokenizer):
    # A head that always says "\n": every answer is one token long, so decoding stops after one step.
    model = copy.deepcopy(tiny_llama)
    newline = smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[newline] = 10.0
    model.lm_head = head
    steps = []
    hook = model.model.register_forward_hook(lambda *_: steps.append(1))
    try:
        answers = generate_greedy(model, smollm2_tokenizer, ["Question: Why?\nAnswer:"] * 3, max_new_tokens=20)
    finally:
        hook.remove()
    assert answers == ["", "", ""]
    assert len(steps) == 1  # the prompt's forward gives the newline; no further step


@pytest.mark.parametrize("share_prompt", [True, False])
def test_scoring_only_the_scored_rows_gives_the_plain_paths_numbers(
    tiny_llama, smollm2_tokenizer, mixed_examples, share_prompt
):
    fast = choice_loglikelihoods(tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=5, share_prompt=share_prompt)
    with plain("scored_rows_only"):
        slow = choice_loglikelihoods(
            tiny_llama, smollm2_tokenizer, mixed_examples, batch_size=5, share_prompt=share_prompt
        )
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert int(a.argmax()) == int(b.argmax())


def test_options_sharing_their_first_tokens_run_those_rows_through_the_head_once(
    tiny_llama, smollm2_tokenizer, monkeypatch
):
    from fedmkt.head import OutputHead

    example = QAExample(
        "shared", "Question: Which one is ripe?\nAnswer:", (" the red one", " the red two", " the green one", " no"), 0
    )
    options = []
    for choice in example.choices:
        input_ids, targets = encode_prompt_answer(smollm2_tokenizer, example.prompt, choice, 96)
        options.append(tuple(input_ids[int((targets != -100).nonzero()[0]) + 1 :].tolist()))
    assert options[0][:2] == options[1][:2] and options[0][0] == options[2][0]  # " the red", " the"
    # One row after the prompt, then one per distinct option prefix that predicts a further token.
    expected_rows = 1 + len({option[:j] for option in options for j in range(1, len(option))})
    projected = []
    project = OutputHead.project
    monkeypatch.setattr(
        OutputHead, "project", lambda self, hidden: projected.append(len(hidden)) or project(self, hidden)
    )
    embedded = []
    hook = tiny_llama.model.embed_tokens.register_forward_hook(lambda m, i, o: embedded.append(i[0].numel()))
    try:
        (scores,) = choice_loglikelihoods(tiny_llama, smollm2_tokenizer, [example], batch_size=8, max_length=96)
    finally:
        hook.remove()
    assert sum(projected) == expected_rows < sum(len(option) for option in options)
    # The options continue the prompt without their last token (it predicts nothing); " no" is one token.
    longer = [option for option in options if len(option) > 1]
    assert embedded[1:] == [len(longer) * (max(map(len, longer)) - 1)]
    expected = [reference_loglikelihood(tiny_llama, smollm2_tokenizer, example.prompt, c, 96) for c in example.choices]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_acc_and_acc_norm_as_lm_eval_scores_them_worked_out_by_hand(monkeypatch):
    """Options " ab" and " abcde" with summed log-likelihoods -2.1 and -5.0, gold the second:
    acc picks " ab" (-2.1 > -5.0): 0. acc_norm divides by 2 and 5 characters (the joining space is
    not counted): -1.05 < -1.0 picks " abcde": 1. Counting the space (3 and 6 characters) would pick
    " ab" (-0.70 > -0.83) and give 0."""
    import fedmkt.evaluation as evaluation

    example = QAExample("h", "Question: ?\nAnswer:", (" ab", " abcde"), 1)
    monkeypatch.setattr(evaluation, "choice_loglikelihoods", lambda *a, **k: [torch.tensor([-2.1, -5.0])])
    scores = evaluation.evaluate_multiple_choice(None, None, [example])
    assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)
    assert evaluation.completion_len("Answer:", " ab") == 2 and evaluation.completion_len("Answer: ", "ab") == 2
