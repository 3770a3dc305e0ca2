"""Parties on several processes (DDP on CPU with gloo): who runs what, and that the protocol holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedmkt.cli import main
from fedmkt.config import parse_run_config
from fedmkt.errors import FedMKTError
from fedmkt.federation.distributed import (
    RankCoordinatedParticipant,
    lightning_strategy,
    merge_rank_predictions,
    party_processes,
    shards_weights,
    world_size,
)


def _config(*overrides: str):
    return parse_run_config(["--config", "tiny", *overrides])


# ---- which parties span ranks ---------------------------------------------------------------


def test_only_ddp_and_fsdp_parties_span_several_processes():
    config = _config("--server.trainer.strategy", "ddp", "--server.trainer.devices", "2")
    assert party_processes(config.server.trainer) == 2
    assert party_processes(config.clients[0].trainer) == 1
    assert world_size(config) == 2
    # devices: 2 without a ddp/fsdp strategy stays one process (Lightning would launch; fedmkt does not).
    assert world_size(_config("--server.trainer.devices", "2")) == 1


def test_multi_device_parties_must_share_one_world_size():
    config = _config("--server.trainer.strategy", "ddp", "--server.trainer.devices", "2")
    config.clients[0].trainer.strategy, config.clients[0].trainer.devices = "ddp", 3
    with pytest.raises(FedMKTError, match="same `trainer.devices`"):
        world_size(config)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "fsdp_cpu_offload"])
def test_spawning_and_unsupported_strategies_are_refused_with_a_fix(strategy):
    with pytest.raises(FedMKTError, match="Fix: use strategy (ddp|fsdp)"):
        world_size(_config("--server.trainer.strategy", strategy, "--server.trainer.devices", "2"))


def test_fsdp_means_fsdp2_through_lightnings_model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    config = _config("--server.trainer.strategy", "fsdp", "--server.trainer.devices", "2")
    assert world_size(config) == 2 and shards_weights(config.server.trainer)
    strategy = lightning_strategy(config.server.trainer)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    assert lightning_strategy(config.clients[0].trainer) == "auto" and not shards_weights(config.clients[0].trainer)


def test_devices_auto_with_ddp_asks_for_a_number():
    with pytest.raises(FedMKTError, match="devices as a number"):
        world_size(_config("--server.trainer.strategy", "ddp", "--server.trainer.devices", "auto"))


# ---- gathering public-data predictions ------------------------------------------------------


def _batch(indices: list[int], lengths: list[int]) -> dict[str, torch.Tensor]:
    """A predict batch whose per-position values encode (sample index, position)."""
    positions = torch.cat([torch.full((n,), i) * 100 + torch.arange(n) for i, n in zip(indices, lengths)])
    return {
        "index": torch.tensor(indices),
        "nll": torch.tensor(indices, dtype=torch.float),
        "lengths": torch.tensor(lengths),
        "token_ids": positions,
        "topk_ids": positions[:, None].repeat(1, 2),
        "topk_logits": positions[:, None].repeat(1, 2).half(),
    }


def test_merging_rank_shards_keeps_each_sample_once_with_its_own_positions():
    # Rank 1's shard was padded with a repeat of sample 0 (as a distributed sampler does).
    per_rank = [[_batch([0, 2], [3, 1])], [_batch([1, 0], [2, 3])]]
    merged = merge_rank_predictions(per_rank)
    indices = torch.cat([b["index"] for b in merged]).tolist()
    assert sorted(indices) == [0, 1, 2] and len(indices) == 3
    for batch in merged:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), batch["lengths"].cumsum(0)])
        for row, index in enumerate(batch["index"].tolist()):
            values = batch["token_ids"][starts[row] : starts[row + 1]]
            assert values.tolist() == [index * 100 + p for p in range(int(batch["lengths"][row]))]
            assert batch["nll"][row] == index
            assert batch["topk_ids"].shape[0] == batch["token_ids"].shape[0]


# ---- rank coordination over a real gloo process group ---------------------------------------


class _RecordingParticipant:
    """Counts the phases it ran; fails a phase on request (to check that errors reach all ranks)."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0

    def fine_tune(self, round_index: int) -> dict:
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"{self.name} broke on rank {dist.get_rank()}")
        return {"task_loss": float(dist.get_rank() + 10 * round_index), "rank": dist.get_rank()}

    def evaluate(self) -> dict:
        self.calls += 1
        return {"eval_accuracy": 0.5, "rank": dist.get_rank()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _coordination_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        single = RankCoordinatedParticipant(_RecordingParticipant("client_0"), spans_ranks=False)
        spanning = RankCoordinatedParticipant(_RecordingParticipant("server"), spans_ranks=True)
        failing = RankCoordinatedParticipant(_RecordingParticipant("client_1", fail=True), spans_ranks=False)
        outcome = {
            "single": single.fine_tune(1),
            "spanning": spanning.fine_tune(1),
            "evaluate": spanning.evaluate(),
            "name": single.name,
        }
        try:
            failing.fine_tune(1)
        except RuntimeError as error:
            outcome["error"] = str(error)
        outcome["calls"] = (single.participant.calls, spanning.participant.calls, failing.participant.calls)
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_zero_runs_single_device_phases_and_every_rank_gets_its_outcome():
    results = mp.Manager().dict()
    mp.spawn(_coordination_worker, args=(_free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    # A single-device party ran on rank 0 only; a spanning party on both; evaluation on rank 0 only.
    assert zero["calls"] == (1, 2, 1) and one["calls"] == (0, 1, 0)
    # Every rank sees rank 0's results, so all ranks branch alike.
    assert zero["single"] == one["single"] == {"task_loss": 10.0, "rank": 0}
    assert zero["spanning"] == one["spanning"] == {"task_loss": 10.0, "rank": 0}
    assert zero["evaluate"] == one["evaluate"] == {"eval_accuracy": 0.5, "rank": 0}
    # A failure on rank 0 is raised on rank 1 too (quorum decisions must not diverge).
    assert zero["error"] == one["error"] == "client_1 broke on rank 0"
    assert one["name"] == "client_0"  # other attributes pass through


# ---- a default group without a CPU backend (as NCCL's) ---------------------------------------


def _phase_mean_worker(rank: int, port: int, results) -> None:
    from torchmetrics import MeanMetric

    from fedmkt.federation.participant import _phase_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Gloo registered for CUDA tensors only: like an NCCL group, it has no backend for CPU tensors.
    dist.init_process_group("cuda:gloo", rank=rank, world_size=2)
    try:
        metric = MeanMetric(sync_on_compute=False)  # on the CPU, where Lightning's teardown leaves it
        for value in [1.0, 3.0] if rank == 0 else [5.0]:
            metric.update(torch.tensor(value))
        outcome = {}
        try:  # what the metric's own sync does (and fedmkt did before)
            with metric.sync_context(should_sync=True):
                metric.compute()
        except RuntimeError as error:
            outcome["metric_sync_error"] = str(error)
        outcome["mean"] = _phase_mean(metric, spans_ranks=True, empty=float("nan"))
        only_rank_one = MeanMetric(sync_on_compute=False)  # rank 0 saw no batch of this kind
        if rank == 1:
            only_rank_one.update(torch.tensor(2.0))
        outcome["one_sided"] = _phase_mean(only_rank_one, spans_ranks=True, empty=0.0)
        outcome["none"] = _phase_mean(MeanMetric(sync_on_compute=False), spans_ranks=True, empty=-1.0)
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_phase_means_sync_on_the_cpu_when_the_default_group_has_no_cpu_backend():
    results = mp.Manager().dict()
    mp.spawn(_phase_mean_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        outcome = results[rank]
        assert "No backend type associated with device type cpu" in outcome["metric_sync_error"]  # the NCCL failure
        assert outcome["mean"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3: every rank's batches, weighted
        assert outcome["one_sided"] == pytest.approx(2.0)  # no rank returns early and leaves the other waiting
        assert outcome["none"] == -1.0


# ---- bounded waits: a rank failing mid-phase -------------------------------------------------


class _FailsOnRankOne:
    """A spanning phase whose rank 1 raises mid-phase while rank 0 waits in the gradient all-reduce."""

    name = "server"

    def fine_tune(self, round_index: int) -> dict:
        if dist.get_rank() == 1:
            raise RuntimeError("out of memory in step 3 on rank 1")
        gradient = torch.ones(4)
        dist.all_reduce(gradient)  # never joined by rank 1: ends with the default group's timeout
        return {"task_loss": float(gradient.sum())}


def _failing_rank_worker(rank: int, port: int, timeout_s: float, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s))
    try:
        party = RankCoordinatedParticipant(_FailsOnRankOne(), spans_ranks=True)
        start = time.monotonic()
        try:
            party.fine_tune(1)
            results[rank] = ("no error", time.monotonic() - start)
        except RuntimeError as error:
            results[rank] = (str(error), time.monotonic() - start)
        # The fedmkt exchanges still work afterwards, so the federation can go on without this party.
        from fedmkt.federation.distributed import broadcast_from_rank_zero

        results[f"after_{rank}"] = broadcast_from_rank_zero("round continues" if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_a_rank_failing_mid_phase_fails_the_phase_on_every_rank_within_the_timeout():
    timeout_s = 4.0
    results = mp.Manager().dict()
    mp.spawn(_failing_rank_worker, args=(_free_port(), timeout_s, results), nprocs=2, join=True)
    for rank in (0, 1):
        message, waited = results[rank]
        # One line naming the rank that failed first and its own error, not rank 0's timeout.
        assert message == "rank 1 failed in server.fine_tune: RuntimeError: out of memory in step 3 on rank 1"
        assert waited < timeout_s + 30, f"rank {rank} waited {waited:.0f} s"
        assert results[f"after_{rank}"] == "round continues"


def test_rank_timeout_must_be_positive():
    from fedmkt.config import validate

    config = _config("--federation.rank_timeout_s", "0")
    with pytest.raises(FedMKTError, match=r"federation.rank_timeout_s must be > 0\. Fix:"):
        validate(config)
    assert _config().federation.rank_timeout_s == 1800.0  # 30 minutes unless set


# ---- placement: what each rank loads and holds ----------------------------------------------


def _placement_worker(rank: int, port: int, results) -> None:
    import fedmkt.federation.participant as participant_module
    from fedmkt.federation.distributed import coordinate
    from fedmkt.federation.parties import build_participants

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        config = _config("--server.trainer.strategy", "fsdp", "--server.trainer.devices", "2")
        server, clients = build_participants(config)
        outcome = {"loaded": [p.module_loaded for p in (server, *clients)]}
        full = sum(p.numel() for p in server.module.model.parameters())
        coordinated, *_ = coordinate([server, *clients], [p.trainer for p in (config.server, *config.clients)])
        held = []  # the share of the server's weights this rank holds, seen from inside evaluation
        evaluate = participant_module.evaluate_multiple_choice

        def local_share(model: torch.nn.Module) -> float:
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
            return local / full

        def recording_evaluate(model, *args, **kwargs):
            held.append(local_share(model))
            return evaluate(model, *args, **kwargs)

        participant_module.evaluate_multiple_choice = recording_evaluate
        outcome["accuracy"] = coordinated.evaluate()["eval_accuracy"]
        participant_module.evaluate_multiple_choice = evaluate
        outcome["held_during_eval"] = held
        outcome["held_after_eval"] = local_share(server.module.model)
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_load_only_their_parties_and_an_fsdp_party_is_never_whole_on_a_rank():
    results = mp.Manager().dict()
    mp.spawn(_placement_worker, args=(_free_port(), results), nprocs=2, join=True)
    # The fsdp server runs on both ranks; the single-device clients on rank 0 alone.
    assert results[0]["loaded"] == [True, True, True]
    assert results[1]["loaded"] == [True, False, False]
    for rank in (0, 1):
        # Zero-shot evaluation already runs through the shards: each rank holds about half the weights.
        assert len(results[rank]["held_during_eval"]) == 1
        assert 0.45 < results[rank]["held_during_eval"][0] < 0.55
        assert 0.45 < results[rank]["held_after_eval"] < 0.55  # the root unit is freed again afterwards
    # The same score as the whole model in one process (its LoRA starts as a no-op).
    from fedmkt.run import evaluate_party

    whole = evaluate_party(_config(), "server")["eval_accuracy"]
    assert results[0]["accuracy"] == results[1]["accuracy"] == pytest.approx(whole, abs=1e-9)


# ---- end to end: the server on 2 DDP processes ----------------------------------------------


def _fit_in_subprocess(run_dir: Path, *overrides: str) -> None:
    """`fedmkt fit --config tiny` in a fresh process (it launches its own ranks)."""
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("LOCAL_RANK", None)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmkt.cli",
            "fit",
            "--config",
            "tiny",
            "--run_dir",
            str(run_dir),
            "--logging.wandb",
            "false",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_and_single_process_runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    base = tmp_path_factory.mktemp("ddp")
    ddp_dir, single_dir = base / "ddp", base / "single"
    _fit_in_subprocess(ddp_dir, "--server.trainer.strategy", "ddp", "--server.trainer.devices", "2")
    assert main(["fit", "--config", "tiny", "--run_dir", str(single_dir), "--logging.wandb", "false"]) == 0
    load = lambda d: json.loads((d / "summary.json").read_text())  # noqa: E731
    return load(ddp_dir), load(single_dir), ddp_dir


@pytest.mark.slow
def test_ddp_server_trains_on_two_ranks_and_its_payload_covers_all_public_samples(ddp_and_single_process_runs):
    ddp, single, _ = ddp_and_single_process_runs
    assert [r["round"] for r in ddp["rounds"]] == [1, 2]
    for ddp_round, single_round in zip(ddp["rounds"], single["rounds"]):
        server = ddp_round["parties"]["server"]
        assert server["ranks"] == 2 and single_round["parties"]["server"]["ranks"] == 1
        assert torch.isfinite(torch.tensor(server["task_loss"])) and server["task_loss"] > 0
        # Gathered from both ranks: the server's payload has every public sample, so it is as
        # large as the single-process server's (each rank alone holds half).
        assert server["bytes_sent"] == single_round["parties"]["server"]["bytes_sent"]
        assert (
            ddp_round["parties"]["client_0"]["bytes_received"] == single_round["parties"]["client_0"]["bytes_received"]
        )
        assert server["teacher_counts"].keys() == {"client_0", "client_1"}


@pytest.mark.slow
def test_single_device_clients_are_untouched_by_the_ddp_server(ddp_and_single_process_runs):
    ddp, single, _ = ddp_and_single_process_runs
    # Round 1's client fine-tune happens before any server step: identical to the single-process run.
    for client in ("client_0", "client_1"):
        a, b = ddp["rounds"][0]["parties"][client], single["rounds"][0]["parties"][client]
        assert a["ranks"] == 1
        assert a["task_loss"] == pytest.approx(b["task_loss"], abs=1e-6)
        assert a["bytes_sent"] == b["bytes_sent"]
    for party, scores in single["zero_shot"].items():
        assert ddp["zero_shot"][party]["eval_accuracy"] == scores["eval_accuracy"]


@pytest.mark.slow
def test_only_rank_zero_writes_run_outputs(ddp_and_single_process_runs):
    _, _, ddp_dir = ddp_and_single_process_runs
    assert sorted(p.name for p in ddp_dir.glob("logs*")) == ["logs"]
    rows = (ddp_dir / "logs" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + zero-shot + 2 rounds, not twice as many
    assert json.loads((ddp_dir / "checkpoint" / "checkpoint.json").read_text())["round"] == 2
    for party in ("server", "client_0", "client_1"):
        assert (ddp_dir / "adapters" / "round_2" / party / "adapter_model.safetensors").is_file()


# ---- end to end: the server sharded over 2 processes (FSDP2) --------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    _fit_in_subprocess(run_dir, "--server.trainer.strategy", "fsdp", "--server.trainer.devices", "2")
    return json.loads((run_dir / "summary.json").read_text()), run_dir


@pytest.mark.slow
def test_fsdp_server_is_sharded_and_learns_what_the_ddp_server_learns(fsdp_run, ddp_and_single_process_runs):
    from safetensors.torch import load_file

    fsdp, fsdp_dir = fsdp_run
    ddp, _, ddp_dir = ddp_and_single_process_runs
    for fsdp_round, ddp_round in zip(fsdp["rounds"], ddp["rounds"], strict=True):
        server, reference = fsdp_round["parties"]["server"], ddp_round["parties"]["server"]
        assert server["sharded"] is True and server["ranks"] == 2 and "sharded" not in reference
        assert "sharded" not in fsdp_round["parties"]["client_0"]
        # Same data order and the same maths as DDP, only the weights live in halves.
        assert server["task_loss"] == pytest.approx(reference["task_loss"], abs=1e-5)
        assert server["kd_loss"] == pytest.approx(reference["kd_loss"], abs=1e-5)
        assert server["selected"] == reference["selected"] and server["bytes_sent"] == reference["bytes_sent"]
        assert server["eval_accuracy"] == reference["eval_accuracy"]  # evaluated on both ranks in lock-step
    # The checkpointed adapter was gathered whole from both ranks' shards before rank 0 wrote it.
    for round_index in (1, 2):
        sharded = load_file(fsdp_dir / "adapters" / f"round_{round_index}" / "server" / "adapter_model.safetensors")
        replicated = load_file(ddp_dir / "adapters" / f"round_{round_index}" / "server" / "adapter_model.safetensors")
        assert sharded.keys() == replicated.keys()
        for key in sharded:
            assert sharded[key].shape == replicated[key].shape
            # FSDP reduce-scatters gradients and DDP all-reduces them: the same sum in another
            # order, so fp32 rounding (~1e-7 relative per sum) differs. Adam divides by sqrt(v),
            # which amplifies that for coordinates with tiny gradients, and each step moves a weight
            # by up to lr (1e-3 in tiny.yaml); after round 1's steps the adapters agree to ~1e-10,
            # after round 2's to ~1e-5 on some machines. 1e-4 (a tenth of one step) still fails
            # for a wrongly gathered or mis-sliced shard, whose entries differ by O(1e-2) or more.
            assert torch.allclose(sharded[key], replicated[key], rtol=1e-3, atol=1e-4), key


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() == 0,
    reason="FSDP with bf16-mixed on CUDA needs a GPU; none here (the CPU/gloo FSDP path is tested above, bf16-mixed on CPU by hand, see docs/multi_gpu.md)",
)
def test_fsdp_bf16_mixed_on_gpus(tmp_path):
    devices = min(2, torch.cuda.device_count())
    _fit_in_subprocess(
        tmp_path / "run",
        "--server.trainer.accelerator",
        "gpu",
        "--server.trainer.strategy",
        "fsdp",
        "--server.trainer.devices",
        str(devices),
        "--server.trainer.precision",
        "bf16-mixed",
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for record in summary["rounds"]:
        server = record["parties"]["server"]
        assert server["sharded"] is True and server["ranks"] == devices
        assert torch.isfinite(torch.tensor([server["task_loss"], server["kd_loss"]])).all()
    assert (tmp_path / "run" / "adapters" / "round_2" / "server" / "adapter_model.safetensors").is_file()
