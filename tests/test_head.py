"""fedmkt.head: the chunked output head gives the model's own logits, losses and gradients, a chunk at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
)

from fedmkt.errors import FedMKTError
from fedmkt.head import OutputHead, final_hidden_states, head_knowledge, head_label_logprobs, head_training_loss

try:
    from kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference
except ImportError:  # tests/ imported as a package
    from tests.kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference

VOCAB = 97

ARCHITECTURES = {
    "llama": (
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        ["q_proj", "v_proj"],
    ),
    "gemma3_softcapped": (
        Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=5.0,
            sliding_window=4,
        ),
        ["q_proj", "v_proj"],
    ),
    "gpt2": (GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64), ["c_attn"]),
    "opt": (
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        ["q_proj", "v_proj"],
    ),
    "bloom": (BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), ["query_key_value"]),
}


def tiny(name: str, seed: int = 0):
    config, targets = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    return input_ids, attention_mask


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_head_of_the_final_hidden_states_is_the_models_own_logits(name):
    model = tiny(name)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = final_hidden_states(model, input_ids, attention_mask)
        head = OutputHead.of(model, chunk_rows=4)
        got = torch.cat([head.logits(hidden.reshape(-1, hidden.shape[-1])[part]) for part in head.chunks(27)])
    assert hidden.shape == (3, 9, hidden.shape[-1])
    torch.testing.assert_close(got.view_as(expected), expected, rtol=1e-5, atol=1e-5)
    # the model's head really was skipped: its hook is gone and a plain forward is unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)


def dense_objective(logits, labels, ce_w, kd_ids, kd_probs, kd_w, temperature, kind, tail):
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels >= 0)
    reference = dense_tail_kd_loss_reference if tail else dense_kd_loss_reference
    kd = reference(logits.unsqueeze(0), kd_ids.unsqueeze(0), kd_probs.unsqueeze(0), temperature, kind)[0]
    return (ce * ce_w).sum() + (kd * kd_w).sum(), ce, kd


@pytest.mark.parametrize("name", ["llama", "gemma3_softcapped"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize(("temperature", "kind"), [(1.0, "ce"), (2.0, "kl")])
def test_training_loss_and_gradient_match_the_dense_path(name, tail, temperature, kind):
    model = tiny(name).double()
    input_ids, attention_mask = batch()
    hidden_full = final_hidden_states(model, input_ids, attention_mask).detach()
    rows = hidden_full[attention_mask.bool()]  # 24 rows, 7 chunks of 4 (the last one short)
    n = rows.shape[0]
    g = torch.Generator().manual_seed(3)
    labels = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(VOCAB, (n,), generator=g), -100)
    kd_ids = torch.argsort(torch.rand(n, VOCAB, generator=g), -1)[:, :5]
    kd_ids[torch.rand(n, 5, generator=g) < 0.2] = -1
    kd_probs = torch.softmax(torch.randn(n, 5, generator=g, dtype=torch.float64), -1) * (0.7 if tail else 1.0)
    ce_w = torch.rand(n, generator=g, dtype=torch.float64)
    kd_w = torch.rand(n, generator=g, dtype=torch.float64)

    ours_in = rows.clone().requires_grad_(True)
    head = OutputHead.of(model, chunk_rows=4)
    loss, ce_rows, kd_rows = head_training_loss(
        head, ours_in, labels, ce_w, kd_ids, kd_probs, kd_w, temperature, kind, tail
    )
    (3.0 * loss).backward()

    dense_in = rows.clone().requires_grad_(True)
    logits = model.get_output_embeddings()(dense_in)
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    expected, ce, kd = dense_objective(logits, labels, ce_w, kd_ids, kd_probs, kd_w, temperature, kind, tail)
    (3.0 * expected).backward()

    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce_rows, ce.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd_rows, kd.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, dense_in.grad, rtol=1e-7, atol=1e-9)


def test_fp32_gradient_matches_within_1e5():
    model = tiny("llama")
    input_ids, attention_mask = batch(1)
    rows = final_hidden_states(model, input_ids, attention_mask).detach()[attention_mask.bool()]
    labels = input_ids[attention_mask.bool()].roll(-1)
    ce_w = torch.full((len(rows),), 1.0 / len(rows))
    ours_in, dense_in = rows.clone().requires_grad_(True), rows.clone().requires_grad_(True)
    head_training_loss(OutputHead.of(model, chunk_rows=5), ours_in, labels, ce_w)[0].backward()
    F.cross_entropy(model.get_output_embeddings()(dense_in), labels).backward()
    torch.testing.assert_close(ours_in.grad, dense_in.grad, rtol=0, atol=1e-5)


def test_knowledge_is_the_top_k_label_logprob_and_logsumexp_of_each_row():
    model = tiny("gemma3_softcapped")
    input_ids, attention_mask = batch(2)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[attention_mask.bool()]
        rows = final_hidden_states(model, input_ids, attention_mask)[attention_mask.bool()]
        labels = torch.where(torch.arange(len(rows)) % 3 == 0, -100, input_ids[attention_mask.bool()])
        got = head_knowledge(OutputHead.of(model, chunk_rows=4), rows, labels, top_k=6, temperature=2.0)
    values, ids = logits.topk(6, dim=-1)
    torch.testing.assert_close(got.topk_values, values, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_ids, ids)
    torch.testing.assert_close(got.logsumexp, torch.logsumexp(logits / 2.0, -1), rtol=1e-5, atol=1e-5)
    logprob = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(got.label_logprob, torch.where(labels >= 0, logprob, 0.0), rtol=1e-5, atol=1e-5)


def test_label_logprobs_read_shared_rows_across_chunks():
    """Labels that share a hidden row (options after one prompt) get that row's log-softmax."""
    model = tiny("gemma3_softcapped")
    input_ids, attention_mask = batch(3)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[attention_mask.bool()]
        hidden = final_hidden_states(model, input_ids, attention_mask)[attention_mask.bool()]
    logprobs = torch.log_softmax(logits, -1)
    rows = torch.tensor(
        [0, 0, 0, 5, 4, 4, 9, 10, 10, 3]
    )  # 4-row chunks: labels read rows of three of them, some rows twice
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 8, 96])
    head = OutputHead.of(model, chunk_rows=4)
    got = head_label_logprobs(head, hidden, labels, rows=rows)
    expected = torch.stack([logprobs[r, label] for r, label in zip(rows.tolist(), labels.tolist())])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    own = torch.arange(len(hidden)) * 7 % VOCAB  # without rows: label n at row n
    torch.testing.assert_close(
        head_label_logprobs(head, hidden, own), logprobs[torch.arange(len(hidden)), own], rtol=1e-5, atol=1e-5
    )


def test_a_trainable_head_is_refused_with_the_fix():
    config, _ = ARCHITECTURES["llama"]
    model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(FedMKTError, match="remove lm_head from lora.target_modules"):
        OutputHead.of(model)
