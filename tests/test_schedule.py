"""One learning-rate schedule per party across the run (`optimizer.schedule: run`)."""

from __future__ import annotations

import lightning as L
import pytest
from torch.utils.data import DataLoader

from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
from fedmkt.federation.trainer import trained_phases
from fedmkt.party_module import PartyModule
from fedmkt.schedule import ScheduleSpan, lr_factor, phase_lr_lambda, run_span
from tests.test_party_module import make_batch


def test_the_factor_warms_up_linearly_then_falls_along_a_half_cosine():
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)  # half-way up the warm-up
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)  # half-way down: cos(pi/2) = 0
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0)
    assert lr_factor(0.5, 0.0) == pytest.approx(0.5)


def test_each_phase_takes_its_planned_span_in_the_order_the_party_runs_them():
    client = {"fine_tune": 300, "distill": 150}
    assert run_span(client, "fine_tune", 1, rounds=2) == ScheduleSpan(0, 300, 900)
    assert run_span(client, "distill", 1, rounds=2) == ScheduleSpan(300, 150, 900)
    assert run_span(client, "distill", 2, rounds=2) == ScheduleSpan(750, 150, 900)
    assert run_span({"distill": 50}, "distill", 3, rounds=3) == ScheduleSpan(100, 50, 150)


def test_a_phase_spreads_its_steps_over_its_span_whatever_their_number():
    span = ScheduleSpan(0, 100, 100)
    two, four = phase_lr_lambda(span, 2, 0.0), phase_lr_lambda(span, 4, 0.0)
    assert two(0) == pytest.approx(lr_factor(0.25, 0.0)) and two(1) == pytest.approx(lr_factor(0.75, 0.0))
    assert four(0) > two(0) > four(1) and four(3) < two(1)
    assert 0 < four(3) and four(0) < 1  # neither end of the run at rate 0 or past the peak


@pytest.mark.parametrize(
    "mode, party, phases",
    [
        ("fedmkt", "server", ("distill",)),
        ("fedmkt", "client_1", ("fine_tune", "distill")),
        ("standalone", "client_0", ("fine_tune",)),
        ("centralized", "server", ("fine_tune",)),
        ("centralized", "client_0", ()),
        ("llm2slm", "server", ()),
    ],
)
def test_the_schedule_plans_only_the_phases_a_mode_trains(mode, party, phases):
    assert trained_phases(mode, party) == phases


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["run", "phase"])
def test_a_phase_trains_at_the_rates_of_its_part_of_the_run(make_tiny_llama, smollm2_tokenizer, schedule):
    module = PartyModule(
        make_tiny_llama(len(smollm2_tokenizer)),
        LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        OptimizerConfig(lr=1e-2, warmup_ratio=0.1, weight_decay=0.0, schedule=schedule),
        TransferConfig(),
        name="client_0",
    )
    module.schedule_span = ScheduleSpan(450, 150, 900)  # round 2's distillation of the client above
    rates = LearningRates()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[rates],
    )  # fmt: skip
    batch = make_batch(smollm2_tokenizer)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 3, batch_size=None))
    if schedule == "run":
        # Steps at 475, 525 and 575 of 900 samples: 0.5 (1 + cos(pi (p - 0.1) / 0.9)), worked out once.
        assert rates.seen == pytest.approx([1e-2 * 0.538746, 1e-2 * 0.441954, 1e-2 * 0.347337], rel=1e-5)
    else:  # the phase's own schedule: no warm-up step in 3 (rounded down), cosine over 3 steps
        assert rates.seen == pytest.approx([1e-2, 1e-2 * 0.75, 1e-2 * 0.25])
