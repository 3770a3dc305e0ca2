"""The trainer–party contract: `PhaseStats` as summary.json records it, and who implements `FederatedParty`."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict

import pytest

from fedmkt.federation.participant import Participant
from fedmkt.federation.protocol import FederatedParty, PhaseStats

# The keys of a party's round entry in summary.json before evaluation, traffic and failures join it.
UNTRAINED_KEYS = ["task_loss", "kd_loss", "selected", "teacher_counts", "train_seconds"]
CLIENT_ROUND_KEYS = [
    "task_loss",
    "distill_task_loss",
    "kd_loss",
    "selected",
    "teacher_counts",
    "train_seconds",
    "ranks",
]


def test_a_party_that_did_not_train_records_nan_task_loss_and_no_ranks():
    entry = PhaseStats().to_dict()
    assert list(entry) == UNTRAINED_KEYS
    assert math.isnan(entry["task_loss"])
    assert {k: v for k, v in entry.items() if k != "task_loss"} == {
        "kd_loss": 0.0,
        "selected": 0,
        "teacher_counts": {},
        "train_seconds": 0.0,
    }


def test_a_trained_phase_adds_its_ranks_and_marks_sharding_only_when_sharded():
    distilled = PhaseStats(1.5, 0.2, 3.0, ranks=2, selected=4, teacher_counts={"client_0": 4})
    assert distilled.to_dict() == {
        "task_loss": 1.5,
        "kd_loss": 0.2,
        "selected": 4,
        "teacher_counts": {"client_0": 4},
        "train_seconds": 3.0,
        "ranks": 2,
    }
    assert list(PhaseStats(1.0, ranks=2, sharded=True).to_dict()) == UNTRAINED_KEYS + ["ranks", "sharded"]


def test_a_clients_round_keeps_its_local_task_loss_and_takes_kd_and_selection_from_distillation():
    local = PhaseStats(task_loss=1.0, train_seconds=0.5, ranks=1)
    distilled = PhaseStats(task_loss=2.0, kd_loss=0.25, train_seconds=1.0, ranks=2, selected=3, teacher_counts={"s": 3})
    entry = local.then(distilled).to_dict()
    assert list(entry) == CLIENT_ROUND_KEYS
    assert entry == {
        "task_loss": 1.0,
        "distill_task_loss": 2.0,
        "kd_loss": 0.25,
        "selected": 3,
        "teacher_counts": {"s": 3},
        "train_seconds": 1.5,
        "ranks": 2,
    }
    assert local.then(PhaseStats()).to_dict()["ranks"] == 1  # a frozen distillation: the local phase's ranks
    assert PhaseStats().then(PhaseStats()).to_dict()["ranks"] == 1  # neither trained: one process
    assert local.then(PhaseStats(sharded=True)).to_dict()["sharded"] is True
    assert math.isnan(local.then(PhaseStats()).to_dict()["distill_task_loss"])


def test_phase_stats_cross_the_flower_wire_as_their_fields():
    stats = PhaseStats(task_loss=float("nan"), kd_loss=0.5, ranks=1, selected=2, teacher_counts={"server": 2})
    back = PhaseStats(**asdict(stats))
    assert math.isnan(back.task_loss) and asdict(back) | {"task_loss": 0} == asdict(stats) | {"task_loss": 0}


def _members() -> list[str]:
    return [name for name in dir(FederatedParty) if not name.startswith("_")]


def _conforms(cls: type) -> None:
    for name in _members():
        wanted = getattr(FederatedParty, name)
        if isinstance(wanted, property):
            continue  # an attribute or property of the instance
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} lacks {name}"
        expected = list(inspect.signature(wanted).parameters)
        got = list(inspect.signature(method).parameters)
        assert got[: len(expected)] == expected, f"{cls.__name__}.{name}{tuple(got)} does not take {tuple(expected)}"
        extra = [inspect.signature(method).parameters[p] for p in got[len(expected) :]]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{cls.__name__}.{name}: extra arguments"


def test_participant_implements_the_party_protocol():
    _conforms(Participant)
    assert isinstance(Participant.num_public, property)


def test_the_flower_proxy_implements_the_party_protocol(tmp_path):
    pytest.importorskip("flwr")
    from fedmkt.federation.flower.proxy import RemoteParticipant

    _conforms(RemoteParticipant)
    proxy = RemoteParticipant("client_0", node_id=1, grid=None, config_text="", run_dir=tmp_path, num_public=3)
    assert isinstance(proxy, FederatedParty) and proxy.num_public == 3
