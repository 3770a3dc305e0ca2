"""Parties on several devices (Lightning DDP/FSDP) under the one-process round protocol.

Lightning's DDP and FSDP strategies are SPMD: every rank runs the whole program. fedmkt launches
the ranks once, before anything is loaded (`launch_ranks`, through Lightning Fabric), so every rank
walks the same protocol in lock-step:

* a party whose trainer spans several devices (strategy ddp or fsdp) runs each phase on every rank
  (Lightning shards the batches; public-data predictions are gathered from all ranks before they
  become a payload);
* a single-device party runs its phases on rank 0 only;
* either way rank 0's result — stats, payload, or the error that made a client fail — is broadcast,
  so all ranks take the same branch (quorum, failures) and a multi-rank receiver distills from the
  same teacher payload on every rank;
* summary.json, logs and checkpoint files are written by rank 0 alone. An fsdp party's weights are
  sharded, so its evaluation runs on all its ranks in lock-step and its adapter is gathered from
  all ranks before rank 0 writes it; a ddp party's replicated weights are evaluated by rank 0;
* a rank builds only the parties it runs: a single-device party's model exists on rank 0 alone, and
  an fsdp party is sharded when it is built (`coordinate`), so no rank ever holds its whole model.

Two process groups: the default one (NCCL on GPUs, gloo on CPU) carries the collectives inside a
phase (gradients, FSDP all-gathers) with timeout `federation.rank_timeout_s`, so a rank that fails
mid-phase makes its peers fail that phase within it. fedmkt's own exchanges (phase outcomes,
public-data predictions, loss metrics) are CPU objects and go over a separate gloo group: an NCCL
group has no CPU backend, and that group waits as long as rank 0 runs a single-device phase.

`strategy: fsdp` is PyTorch's FSDP2 (`fully_shard`) through Lightning's `ModelParallelStrategy`
(data-parallel only): Lightning's older `FSDPStrategy` and PyTorch's FSDP1 need CUDA, FSDP2 runs
on CPU (gloo) as well, so the same path is tested here and used on GPUs.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from fedmkt.config import RunConfig, TrainerConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.protocol import PhaseStats

# Ranks wait in the coordination group while rank 0 runs a single-device party's phase (a whole
# client fine-tune, say), which may take hours; the client's own bound is federation.client_timeout_s.
# A rank that dies closes its connections, so its peers fail at once instead of waiting this long.
SINGLE_DEVICE_PHASE_WAIT = timedelta(hours=12)

_coordination: Optional[Any] = None  # the gloo group for fedmkt's CPU-object exchanges

_SPMD_STRATEGIES = ("ddp", "fsdp")


def shards_weights(trainer: TrainerConfig) -> bool:
    """Whether this party's weights are sharded over its ranks (strategy fsdp)."""
    return str(trainer.strategy) == "fsdp"


def lightning_strategy(trainer: TrainerConfig) -> Any:
    """The `strategy` argument for this party's Lightning trainers.

    `fsdp` becomes `ModelParallelStrategy` (FSDP2, data-parallel over the party's devices;
    `PartyModule.configure_model` shards it). A single-GPU party (`auto` on a machine with CUDA)
    gets `ResidentSingleDeviceStrategy`, which leaves the model on the GPU between phases; anything
    else is passed to Lightning as written.
    """
    device = resident_device(trainer)
    if device is not None:
        return resident_strategy(device)
    if not shards_weights(trainer):
        return trainer.strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    # fedmkt's launch_ranks has already created the process group (and its timeout); Lightning reuses it.
    return ModelParallelStrategy(data_parallel_size=party_processes(trainer), tensor_parallel_size=1)


def resident_device(trainer: TrainerConfig) -> Optional[torch.device]:
    """The one CUDA device a single-process party runs on, or None (CPU, several devices, a named strategy)."""
    if (
        trainer.strategy != "auto"
        or trainer.accelerator not in ("auto", "gpu", "cuda")
        or not torch.cuda.is_available()
    ):
        return None
    devices = trainer.devices
    if isinstance(devices, (list, tuple)) and len(devices) == 1:
        return torch.device("cuda", int(devices[0]))
    if devices in (1, "1", "auto"):
        return torch.device("cuda", 0)
    return None


def resident_strategy(device: torch.device) -> Any:
    """Lightning's single-device strategy, minus its move of the model to the CPU when a phase ends.

    Lightning's teardown moves the module to the CPU after every fit and predict, and the next
    phase's setup moves it back: for heterogeneous.yaml about 165 GB of host-device copies a round.
    The party itself decides when to leave the device (`Participant._park`). The optimizer is
    rebuilt every phase, so nothing else of the teardown is needed.
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class ResidentSingleDeviceStrategy(SingleDeviceStrategy):
        def teardown(self) -> None:
            self.precision_plugin.teardown()
            assert self.accelerator is not None
            self.accelerator.teardown()
            self.checkpoint_io.teardown()

    return ResidentSingleDeviceStrategy(device=device)


def party_processes(trainer: TrainerConfig) -> int:
    """How many processes (ranks) this party's Lightning trainer uses: 1 unless strategy is ddp/fsdp."""
    if not str(trainer.strategy).startswith(_SPMD_STRATEGIES):
        return 1
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    raise FedMKTError(
        f"trainer.devices={devices!r} with strategy {trainer.strategy}: fedmkt needs the number of processes up front. "
        "Fix: give devices as a number, e.g. `devices: 2`."
    )


def world_size(config: RunConfig) -> int:
    """Ranks the run needs: 1, or the shared device count of every multi-device party."""
    parties = config.parties()
    for name, party in parties.items():
        if party.trainer.strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
            raise FedMKTError(
                f"{name}.trainer.strategy={party.trainer.strategy}: spawned ranks would train a copy of the party outside "
                "the round protocol. Fix: use strategy ddp (or fsdp); fedmkt launches the ranks itself."
            )
        if str(party.trainer.strategy).startswith("fsdp") and not shards_weights(party.trainer):
            raise FedMKTError(
                f"{name}.trainer.strategy={party.trainer.strategy}: only plain `fsdp` (FSDP2) is supported; CPU offload "
                "and Lightning's FSDP1 variants are not. Fix: use strategy fsdp or ddp."
            )
    sizes = {name: party_processes(party.trainer) for name, party in parties.items()}
    multi = {name: size for name, size in sizes.items() if size > 1}
    if len(set(multi.values())) > 1:
        listing = ", ".join(f"{name}: {size}" for name, size in multi.items())
        raise FedMKTError(
            f"multi-device parties must share one world size, got {listing}. "
            "Fix: give every ddp/fsdp party the same `trainer.devices` (the others use devices: 1)."
        )
    return next(iter(multi.values()), 1)


def launch_ranks(config: RunConfig) -> None:
    """Start the other ranks (they re-run this command) and join the process group; no-op for 1 rank.

    Lightning's script launcher sets LOCAL_RANK afterwards, so the per-phase trainers reuse these
    processes and this process group instead of launching again.
    """
    size = world_size(config)
    if size == 1 or dist.is_initialized():
        return
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    parties = [config.server, *config.clients]
    accelerator = next(p.trainer.accelerator for p in parties if party_processes(p.trainer) > 1)
    timeout = timedelta(seconds=config.federation.rank_timeout_s)
    Fabric(accelerator=accelerator, devices=size, strategy=DDPStrategy(timeout=timeout)).launch()
    coordination_group()  # created now, in the same order on every rank


def coordination_group() -> Any:
    """The gloo group fedmkt exchanges CPU objects over (created on first use; every rank must call).

    The default group may be NCCL, which has no CPU backend ("No backend type associated with
    device type cpu"); gloo takes CPU tensors whatever the default group is.
    """
    global _coordination
    if _coordination is None:
        _coordination = dist.new_group(backend="gloo", timeout=SINGLE_DEVICE_PHASE_WAIT)
    return _coordination


def release_coordination_group() -> None:
    """Forget the coordination group (it belongs to a process group that is being destroyed)."""
    global _coordination
    _coordination = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable objects; identity with one rank)."""
    if not is_distributed():
        return value
    box = [value if is_rank_zero() else None]
    dist.broadcast_object_list(box, src=0, group=coordination_group())
    return box[0]


def all_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, by rank (picklable objects; `[value]` with one rank)."""
    if not is_distributed():
        return [value]
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, value, group=coordination_group())
    return per_rank


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` (a CPU tensor) summed over all ranks, through the CPU-capable coordination group."""
    if not is_distributed():
        return values
    total = values.detach().cpu().clone()
    dist.all_reduce(total, group=coordination_group())
    return total


def gather_predictions(outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """All ranks' `PartyModule.predict_step` outputs, each public sample once.

    Under DDP each rank predicts a shard of the public data; a payload must cover all of it. A
    distributed sampler may pad a shard with repeats, so samples already seen are dropped.
    """
    if not is_distributed():
        return outputs
    return merge_rank_predictions(all_ranks(outputs))


def merge_rank_predictions(per_rank: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Concatenate the ranks' predict batches, keeping the first occurrence of every sample index."""
    merged, seen = [], set()
    for batch in (b for rank_outputs in per_rank for b in rank_outputs):
        keep = []
        for position, index in enumerate(batch["index"].tolist()):
            if index not in seen:
                seen.add(index)
                keep.append(position)
        if len(keep) == len(batch["index"]):
            merged.append(batch)
        elif keep:
            merged.append(_select_samples(batch, keep))
    return merged


def _select_samples(batch: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The `keep` samples of one predict batch (per-sample and per-position tensors cut alike)."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), batch["lengths"].long().cumsum(0)])
    positions = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in keep])
    rows = torch.tensor(keep)
    per_sample = {"index", "nll", "lengths"}
    return {key: value[rows] if key in per_sample else value[positions] for key, value in batch.items()}


class RankCoordinatedParticipant:
    """A `Participant` seen through the rank rules in this module's docstring.

    The federated trainer calls it exactly like a participant; with one rank every call passes
    straight through.
    """

    def __init__(self, participant: Any, spans_ranks: bool, sharded: bool = False) -> None:
        self.participant = participant
        self.spans_ranks = spans_ranks
        self.sharded = sharded and spans_ranks

    def __getattr__(self, attribute: str) -> Any:  # name, data, adapter_state (a collective when sharded), ...
        return getattr(self.participant, attribute)

    def _runs_here(self) -> bool:
        return self.spans_ranks or is_rank_zero()

    def _phase(self, method: Callable[..., Any], *args: Any) -> Any:
        """Run a phase where the rules say, hand every rank the same outcome (result or error).

        A phase spanning ranks fails when any of its ranks fails; the error reported is the one
        raised first. A rank that raises mid-phase leaves its peers waiting in a collective, which
        the default group's timeout (`federation.rank_timeout_s`) ends, so the phase fails within it.
        """
        if not self.spans_ranks:
            result, error = broadcast_from_rank_zero(_attempt(method, *args) if is_rank_zero() else None)
            if error is not None:
                raise error
            return result
        result, error = _attempt(method, *args)
        failures = [
            (failed_at, rank_index, failure)
            for rank_index, (failed_at, failure) in enumerate(
                all_ranks((time.time(), error) if error else (None, None))
            )
            if failure is not None
        ]
        if failures:
            _, first, failure = min(failures, key=lambda item: item[0])
            raise RuntimeError(f"rank {first} failed in {self.name}.{method.__name__}: {_one_line(failure)}")
        return broadcast_from_rank_zero(result)

    def fine_tune(self, round_index: int) -> PhaseStats:
        return self._phase(self.participant.fine_tune, round_index)

    def share_knowledge(self, round_index: int):
        return self._phase(self.participant.share_knowledge, round_index)

    def distill(self, round_index: int, teacher_payloads: dict) -> PhaseStats:
        return self._phase(self.participant.distill, round_index, teacher_payloads)

    def evaluate(self) -> dict:
        """Rank 0 scores replicated weights; sharded ones need every rank's forward. All get rank 0's numbers."""
        runs_here = self.sharded or is_rank_zero()
        return broadcast_from_rank_zero(self.participant.evaluate() if runs_here else None)

    # Adapter state: a single-device party's model lives on rank 0 alone; the others take its word.

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole LoRA state on every rank (a collective gather when sharded)."""
        if self.sharded:
            return self.participant.adapter_state()
        return broadcast_from_rank_zero(self.participant.adapter_state() if is_rank_zero() else None)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if self._runs_here():
            self.participant.load_adapter_state(state)

    def load_adapter(self, directory: Any) -> None:
        if self._runs_here():
            self.participant.load_adapter(directory)

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        if self._runs_here():
            self.participant.restore_public_losses(losses)

    def save_adapter(self, directory: Any) -> None:
        """Rank 0 writes the adapter; a sharded party's ranks first gather it together."""
        if self.sharded:
            state = self.participant.adapter_state()
            if is_rank_zero():
                self.participant.save_adapter(directory, state)
        elif is_rank_zero():
            self.participant.save_adapter(directory)


def coordinate(participants: list[Any], config_per_party: list[TrainerConfig]) -> list[Any]:
    """Wrap participants for a multi-rank run (sharding fsdp parties now); the same objects with one rank.

    Sharding here, before any evaluation or restore, means an fsdp party's whole model never sits
    on one rank's device: zero-shot evaluation already runs through the sharded module.
    """
    if not is_distributed():
        return participants
    wrapped = []
    for participant, trainer in zip(participants, config_per_party):
        if shards_weights(trainer):
            participant.module.shard(party_mesh(trainer))
        wrapped.append(
            RankCoordinatedParticipant(participant, party_processes(trainer) > 1, sharded=shards_weights(trainer))
        )
    return wrapped


def party_mesh(trainer: TrainerConfig) -> Any:
    """The 1-D data-parallel device mesh over all ranks that an fsdp party is sharded on."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("data_parallel",))


def _attempt(method: Callable[..., Any], *args: Any) -> tuple[Optional[Any], Optional[BaseException]]:
    """(result, None) or (None, error); the error made picklable so it can cross to other ranks."""
    try:
        return method(*args), None
    except Exception as error:  # re-raised on every rank by the caller, so all ranks branch alike
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(_one_line(error))
        return None, error


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
