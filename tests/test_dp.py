"""DP-SGD on private data: clipped per-sample gradients, noise, Poisson batches, and the epsilon an accountant gives."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fedmkt.cli import main
from fedmkt.config import DPConfig, LoRAConfig, OptimizerConfig, TransferConfig, parse_run_config, validate
from fedmkt.data.tokenize import IGNORE_INDEX, collate, encode_prompt_answer
from fedmkt.dp import DPPlan, epsilon_after, plan_dp, poisson_batches, private_step
from fedmkt.errors import FedMKTError
from fedmkt.party_module import PartyModule

pytest.importorskip("opacus")


def plan(**overrides) -> DPPlan:
    values = dict(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=4 / 300,
        steps_per_epoch=75,
        epochs_per_round=1,
        delta=1e-5,
        num_samples=300,
    )
    return DPPlan(**(values | overrides))


def _module(make_tiny_llama, tokenizer) -> PartyModule:
    torch.manual_seed(0)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    module = PartyModule(make_tiny_llama(len(tokenizer)), lora, OptimizerConfig(lr=1e-2), TransferConfig())
    for name, param in module.named_parameters():  # B = 0 would make every first-step gradient of A vanish
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return module


def _batch(tokenizer):
    pairs = [("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"), ("Q: 2+2?\nA:", " four")]
    items = []
    for index, (prompt, answer) in enumerate(pairs):
        ids, targets = encode_prompt_answer(tokenizer, prompt, answer, 64)
        items.append({"index": index, "input_ids": ids, "targets": targets})
    return collate(items, tokenizer.pad_token_id)


def test_each_samples_gradient_is_clipped_then_summed_over_the_expected_batch(make_tiny_llama, smollm2_tokenizer):
    module = _module(make_tiny_llama, smollm2_tokenizer)
    batch = _batch(smollm2_tokenizer)
    params = [p for p in module.model.parameters() if p.requires_grad]
    tiny_clip = plan(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=0.5, num_samples=4)  # q * N = 2

    def loss_of(row):
        sample = {k: v[row : row + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return module._objective(sample)[0]

    got, norms = private_step(params, [lambda r=r: loss_of(r) for r in range(2)], tiny_clip)

    # The oracle: each sample's CE through the model's full logits, its gradient by autograd, clipped by hand.
    expected = [torch.zeros_like(p) for p in params]
    for row in range(2):
        logits = module(batch["input_ids"][row : row + 1], batch["attention_mask"][row : row + 1])
        ce = F.cross_entropy(logits[0], batch["targets"][row], ignore_index=IGNORE_INDEX)
        grads = torch.autograd.grad(ce, params)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norm == pytest.approx(norms[row], rel=1e-4) and norm > 1e-3  # really clipped
        for acc, g in zip(expected, grads):
            acc += g * (1e-3 / norm)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b / 2, rtol=1e-4, atol=1e-9)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in got))
    assert total <= 2 * 1e-3 / 2 + 1e-9  # at most the sum of C over the expected batch


def test_the_noise_has_standard_deviation_sigma_c_over_the_expected_batch():
    param = torch.zeros(200, 100, requires_grad=True)
    noisy = plan(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.1, num_samples=40)  # q * N = 4
    (grad,), norms = private_step([param], [], noisy)  # an empty Poisson batch: noise alone
    assert norms == [] and float(grad.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    (again,), _ = private_step([param], [], noisy)
    assert not torch.equal(grad, again)  # fresh entropy, no seed a receiver could know


def test_poisson_batches_draw_each_sample_with_probability_q():
    sampler = poisson_batches(300, plan())
    sizes = [len(batch) for _ in range(20) for batch in sampler]
    assert len(sizes) == 20 * 75
    assert sum(sizes) / len(sizes) == pytest.approx(4.0, rel=0.1)  # q * N
    assert min(sizes) == 0 or max(sizes) > 4  # sizes vary: not fixed batches


def test_epsilon_follows_the_rdp_accountant_for_the_steps_taken():
    from opacus.accountants import RDPAccountant

    dp = DPConfig(enabled=True, noise_multiplier=1.1, delta=1e-5)
    planned = plan_dp(dp, num_samples=300, batch_size=4, epochs_per_round=2, rounds=3)
    assert planned.sample_rate == pytest.approx(4 / 300) and planned.steps_per_epoch == 300 // 4
    spent = [epsilon_after(planned, r) for r in range(4)]
    assert spent[0] == 0 and spent[1] < spent[2] < spent[3]
    for rounds_done in (1, 3):
        oracle = RDPAccountant()
        for _ in range(rounds_done * 2 * (300 // 4)):  # every step of every epoch of every round, one at a time
            oracle.step(noise_multiplier=1.1, sample_rate=4 / 300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert spent[rounds_done] == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-6)


def test_a_target_epsilon_is_met_by_the_end_of_the_run():
    planned = plan_dp(
        DPConfig(enabled=True, target_epsilon=3.0), num_samples=300, batch_size=4, epochs_per_round=1, rounds=3
    )
    assert 2.7 <= epsilon_after(planned, 3) <= 3.0
    assert (
        planned.noise_multiplier > plan_dp(DPConfig(enabled=True, target_epsilon=8.0), 300, 4, 1, 3).noise_multiplier
    )  # less epsilon, more noise


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["--privacy.dp.noise_multiplier", "1.0", "--privacy.dp.target_epsilon", "8"], "exactly one of"),
        ([], "exactly one of"),
        (["--privacy.dp.target_epsilon", "8", "--privacy.dp.delta", "2"], "delta must be in (0, 1)"),
        (["--privacy.dp.target_epsilon", "8", "--privacy.dp.max_grad_norm", "0"], "max_grad_norm must be > 0"),
    ],
)
def test_bad_dp_settings_are_one_line_errors(overrides, needle):
    config = parse_run_config(["--config", "tiny", "--privacy.dp.enabled", "true", *overrides])
    with pytest.raises(FedMKTError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


@pytest.mark.slow
def test_a_dp_run_of_tiny_models_reports_the_epsilon_spent_every_round(tmp_path):
    run_dir = tmp_path / "dp"
    assert main(["fit", "--config", "tiny_dp", "--run_dir", str(run_dir), "--logging.wandb", "false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    spent = {
        name: [r["parties"][name].get("dp_epsilon") for r in summary["rounds"]] for name in ("client_0", "client_1")
    }
    for epsilons in spent.values():
        assert 0 < epsilons[0] < epsilons[1] <= 8.0  # grows each round, within the target
    assert all(r["parties"]["client_0"]["dp_delta"] == 1e-5 for r in summary["rounds"])
    assert all("dp_epsilon" not in r["parties"]["server"] for r in summary["rounds"])  # the server has no private data
