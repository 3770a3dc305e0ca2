"""PartyModule: LoRA on a frozen base, task CE / λ·CE + (1−λ)·KD training, top-k knowledge sharing."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.errors import FedMKTError
from fedmkt.fastpaths import plain
from fedmkt.party_module import PartyModule

try:
    from kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference
except ImportError:  # tests/ imported as a package
    from tests.kd_reference import dense_kd_loss_reference, dense_tail_kd_loss_reference

# training_step is also called directly, without a Trainer; Lightning then skips self.log with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

PROMPTS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: What is two plus two?\nAnswer:", " four"),
]


def make_module(make_tiny_llama, tokenizer, top_k=5, ce_weight=0.9, lr=1e-2, **lora) -> PartyModule:
    lora_config = LoRAConfig(**({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]} | lora))
    return PartyModule(
        make_tiny_llama(len(tokenizer)),
        lora_config,
        OptimizerConfig(lr=lr, warmup_ratio=0.0, weight_decay=0.0),
        TransferConfig(top_k=top_k, ce_weight=ce_weight),
        name="client_0",
    )


def make_batch(tokenizer, prompts=PROMPTS):
    items = []
    for index, (prompt, answer) in enumerate(prompts):
        input_ids, targets = encode_prompt_answer(tokenizer, prompt, answer, max_length=64)
        items.append({"index": index, "input_ids": input_ids, "targets": targets})
    return collate(items, tokenizer.pad_token_id)


def add_kd_targets(batch, vocab_size, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, length = batch["input_ids"].shape
    batch = dict(batch)
    batch["kd_ids"] = torch.randint(vocab_size, (b, length, k), generator=g)
    batch["kd_probs"] = torch.softmax(torch.randn(b, length, k, generator=g), dim=-1)
    batch["kd_mask"] = batch["attention_mask"].bool().clone()
    batch["kd_mask"][:, -1] = False
    return batch


def lora_grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


# ---- structure ----------------------------------------------------------------------------------


def test_only_lora_parameters_are_trainable(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # q_proj and v_proj adapted (A and B each), nothing else
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert module.vocab_size == len(smollm2_tokenizer)


def test_missing_lora_target_is_a_one_line_error(make_tiny_llama, smollm2_tokenizer):
    with pytest.raises(FedMKTError) as error:
        make_module(make_tiny_llama, smollm2_tokenizer, target_modules=["c_attn"])
    message = str(error.value)
    assert "c_attn" in message and "lora.target_modules" in message and "Fix:" in message
    assert "\n" not in message


# ---- training -----------------------------------------------------------------------------------


def test_fit_changes_only_lora_parameters(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = make_batch(smollm2_tokenizer)
    trainer = _trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero; it must have moved
    # the optimiser holds exactly the trainable (LoRA) parameters
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}
    assert module.task_loss.update_count == 2 and module.kd_loss.update_count == 0
    assert torch.isfinite(module.task_loss.compute())


def test_training_step_without_kd_is_mean_answer_ce(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer)
    batch = make_batch(smollm2_tokenizer)
    loss = module.training_step(batch, 0)
    logits = module(batch["input_ids"], batch["attention_mask"])
    expected = torch.stack(
        [F.cross_entropy(logits[b], batch["targets"][b], ignore_index=IGNORE_INDEX) for b in range(len(logits))]
    ).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def objective_by_hand(module, batch, kd_batch, ce_weight, temperature, eligible, tail=False):
    """mean over samples of λ·CE_b + (1−λ)·T²·(sum of KD over b's distilled positions / b's eligible count)."""
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])
        reference = dense_tail_kd_loss_reference if tail else dense_kd_loss_reference
        kd = reference(logits, kd_batch["kd_ids"], kd_batch["kd_probs"], temperature)
    terms = []
    for b in range(len(logits)):
        ce_b = F.cross_entropy(logits[b], batch["targets"][b], ignore_index=IGNORE_INDEX)
        kd_b = kd[b][kd_batch["kd_mask"][b]].sum() / eligible[b].sum()
        terms.append(ce_weight * ce_b + (1 - ce_weight) * temperature**2 * kd_b)
    return torch.stack(terms).mean(), kd


def test_training_step_with_kd_is_lambda_mix_and_changes_the_gradient(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer, ce_weight=0.7)
    batch = make_batch(smollm2_tokenizer)
    kd_batch = add_kd_targets(batch, len(smollm2_tokenizer))

    module.zero_grad()
    plain_loss = module.training_step(batch, 0)
    plain_loss.backward()
    plain = lora_grads(module)

    module.zero_grad()
    kd_loss = module.training_step(kd_batch, 0)
    kd_loss.backward()
    distilled = lora_grads(module)

    assert plain.keys() == distilled.keys() and plain
    assert any(not torch.allclose(plain[n], distilled[n]) for n in plain)

    expected, kd = objective_by_hand(module, batch, kd_batch, 0.7, 1.0, kd_batch["kd_mask"])
    torch.testing.assert_close(kd_loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert module.kd_loss.update_count == 1
    torch.testing.assert_close(module.kd_loss.compute(), kd[kd_batch["kd_mask"]].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kd_positions", ["all", "answer"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_training_step_is_a_per_sample_mix_over_eligible_positions(
    make_tiny_llama, smollm2_tokenizer, kd_positions, temperature
):
    # Sample 1 is eligible but was not selected: it adds no KD, yet counts in the batch mean.
    module = make_module(make_tiny_llama, smollm2_tokenizer, ce_weight=0.5)
    module.transfer.temperature = temperature
    batch = make_batch(smollm2_tokenizer)
    kd_batch = add_kd_targets(batch, len(smollm2_tokenizer))
    eligible = kd_batch["kd_mask"].clone()
    if kd_positions == "answer":
        eligible &= batch["targets"] != IGNORE_INDEX
    kd_batch["kd_eligible"] = eligible
    kd_batch["kd_mask"] = eligible.clone()
    kd_batch["kd_mask"][1:] = False
    with torch.no_grad():
        loss = module.training_step(kd_batch, 0)
    expected, _ = objective_by_hand(module, batch, kd_batch, 0.5, temperature, eligible)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_training_step_with_tail_targets_matches_the_dense_tail_loss(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer, ce_weight=0.5)
    module.transfer.topk_target = "tail"
    batch = make_batch(smollm2_tokenizer)
    kd_batch = add_kd_targets(batch, len(smollm2_tokenizer))
    g = torch.Generator().manual_seed(1)
    b, length, k = kd_batch["kd_ids"].shape
    kd_batch["kd_ids"] = torch.argsort(torch.rand(b, length, len(smollm2_tokenizer), generator=g), -1)[..., :k]
    kd_batch["kd_probs"] = kd_batch["kd_probs"] * 0.6  # the teacher leaves 40 % to the other tokens
    with torch.no_grad():
        loss = module.training_step(kd_batch, 0)
    expected, _ = objective_by_hand(module, batch, kd_batch, 0.5, 1.0, kd_batch["kd_mask"], tail=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_training_step_gradient_matches_the_dense_logits_path(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer, ce_weight=0.3)
    batch = make_batch(smollm2_tokenizer)
    kd_batch = add_kd_targets(batch, len(smollm2_tokenizer))
    module.zero_grad()
    module.training_step(kd_batch, 0).backward()
    chunked = lora_grads(module)
    module.zero_grad()
    expected, _ = objective_with_grad(module, batch, kd_batch, 0.3)
    expected.backward()
    dense = lora_grads(module)
    assert chunked.keys() == dense.keys() and chunked
    for name in dense:
        torch.testing.assert_close(chunked[name], dense[name], rtol=1e-5, atol=1e-6)


def objective_with_grad(module, batch, kd_batch, ce_weight):
    """The objective through the model's full [B, L, V] logits, with autograd (the path before the chunked head)."""
    logits = module(batch["input_ids"], batch["attention_mask"])
    kd = dense_kd_loss_reference(logits, kd_batch["kd_ids"], kd_batch["kd_probs"])
    terms = []
    for b in range(len(logits)):
        ce_b = F.cross_entropy(logits[b], batch["targets"][b], ignore_index=IGNORE_INDEX)
        kd_b = kd[b][kd_batch["kd_mask"][b]].sum() / kd_batch["kd_mask"][b].sum()
        terms.append(ce_weight * ce_b + (1 - ce_weight) * kd_b)
    return torch.stack(terms).mean(), kd


def test_masked_out_kd_positions_do_not_affect_the_loss(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer)
    kd_batch = add_kd_targets(make_batch(smollm2_tokenizer), len(smollm2_tokenizer))
    loss = module.training_step(kd_batch, 0)
    scrambled = dict(kd_batch)
    scrambled["kd_ids"] = kd_batch["kd_ids"].clone()
    scrambled["kd_ids"][~kd_batch["kd_mask"]] = 7  # garbage where the mask is off
    torch.testing.assert_close(module.training_step(scrambled, 0), loss)
    # no KD position at all: λ·CE only
    empty = dict(kd_batch, kd_mask=torch.zeros_like(kd_batch["kd_mask"]))
    ce_only = make_module(make_tiny_llama, smollm2_tokenizer).training_step(make_batch(smollm2_tokenizer), 0)
    torch.testing.assert_close(module.training_step(empty, 0), 0.9 * ce_only, rtol=1e-5, atol=1e-6)


def test_nan_loss_raises_fedmkt_error(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer)
    with torch.no_grad():
        module.model.get_output_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(FedMKTError) as error:
        module.training_step(make_batch(smollm2_tokenizer), 0)
    message = str(error.value)
    assert message.startswith("client_0: loss became nan") and "Fix:" in message and "\n" not in message


# ---- knowledge sharing --------------------------------------------------------------------------


@pytest.mark.parametrize("kd_positions", ["all", "answer"])
def test_predict_step_matches_topk_and_cross_entropy_at_real_positions(
    make_tiny_llama, smollm2_tokenizer, kd_positions
):
    module = make_module(make_tiny_llama, smollm2_tokenizer, top_k=5).eval()
    module.transfer = replace(module.transfer, kd_positions=kd_positions)
    batch = make_batch(smollm2_tokenizer)
    batch["index"] = torch.tensor([7, 3])
    lengths = batch["attention_mask"].sum(-1)
    assert lengths[0] != lengths[1]  # one sample is padded
    with torch.no_grad():
        out = module.predict_step(batch, 0)
        logits = module(batch["input_ids"], batch["attention_mask"])

    assert out["index"].tolist() == [7, 3]
    assert out["lengths"].tolist() == lengths.tolist()
    assert out["topk_logits"].dtype == torch.float16 and out["topk_ids"].shape == (int(lengths.sum()), 5)
    start = 0
    for b, length in enumerate(lengths.tolist()):
        rows = slice(start, start + length)
        values, ids = torch.topk(logits[b, :length], 5, dim=-1)
        assert torch.equal(out["token_ids"][rows], batch["input_ids"][b, :length])
        assert torch.equal(out["topk_ids"][rows], ids)
        assert torch.equal(out["topk_logits"][rows], values.to(torch.float16))
        if kd_positions == "answer":  # the answer's tokens
            expected = F.cross_entropy(logits[b], batch["targets"][b], ignore_index=IGNORE_INDEX, reduction="sum")
        else:  # every real token after the first, predicted from the one before
            expected = F.cross_entropy(logits[b, : length - 1], batch["input_ids"][b, 1:length], reduction="sum")
        torch.testing.assert_close(out["nll"][b], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out["logsumexp"][rows], torch.logsumexp(logits[b, :length], -1), rtol=1e-5, atol=1e-5
        )
        start += length
    assert start == len(out["token_ids"])


def test_predict_step_is_unaffected_by_padding(make_tiny_llama, smollm2_tokenizer):
    module = make_module(make_tiny_llama, smollm2_tokenizer).eval()
    with torch.no_grad():
        together = module.predict_step(make_batch(smollm2_tokenizer), 0)
        alone = module.predict_step(make_batch(smollm2_tokenizer, PROMPTS[1:]), 0)
    length = int(alone["lengths"][0])
    torch.testing.assert_close(together["nll"][1], alone["nll"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(together["topk_ids"][-length:], alone["topk_ids"])


@pytest.mark.parametrize("topk_target", ["renormalize", "tail"])
def test_the_plain_full_logits_path_gives_the_same_loss_gradient_and_knowledge(
    make_tiny_llama, smollm2_tokenizer, topk_target
):
    module = make_module(make_tiny_llama, smollm2_tokenizer, ce_weight=0.4)
    module.transfer.topk_target = topk_target
    module.transfer.temperature = 2.0
    kd_batch = add_kd_targets(make_batch(smollm2_tokenizer), len(smollm2_tokenizer))
    g = torch.Generator().manual_seed(2)
    b, length, k = kd_batch["kd_ids"].shape
    kd_batch["kd_ids"] = torch.argsort(torch.rand(b, length, len(smollm2_tokenizer), generator=g), -1)[..., :k]
    kd_batch["kd_probs"] = kd_batch["kd_probs"] * 0.8
    kd_batch["kd_eligible"] = kd_batch["kd_mask"].clone()
    kd_batch["index"] = torch.tensor([0, 1])
    results = {}
    for fast in (True, False):
        module.zero_grad()
        with contextlib.nullcontext() if fast else plain("chunked_head"):
            loss = module.training_step(kd_batch, 0)
            loss.backward()
            with torch.no_grad():
                shared = module.predict_step(kd_batch, 0)
        results[fast] = loss.detach(), lora_grads(module), shared
    (loss_a, grads_a, shared_a), (loss_b, grads_b, shared_b) = results[True], results[False]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(shared_a["topk_ids"], shared_b["topk_ids"])
    for key in ("nll", "topk_logits", "logsumexp"):
        torch.testing.assert_close(shared_a[key], shared_b[key], rtol=1e-5, atol=1e-5)
