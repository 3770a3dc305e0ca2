"""A party's LoRA adapter as plain tensors, whether its model is whole or FSDP2-sharded.

FedAvg, checkpoints and `--resume` move adapters around as ``{peft key: whole tensor}``. Under
`strategy: fsdp` every parameter is a DTensor holding one rank's shard, so reading the adapter
all-gathers each tensor and writing it keeps each rank's own slice. Both are collectives: every
rank of a sharded party must call them, in the same order.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedmkt.errors import FedMKTError

__all__ = ["adapter_state", "is_sharded", "load_adapter_state", "under_model_keys"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's `fully_shard` (see `PartyModule.configure_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _peft_to_model_keys(model: torch.nn.Module) -> dict[str, str]:
    """peft's adapter key (``...lora_A.weight``) -> the model's key (``...lora_A.default.weight``)."""
    adapter = getattr(model, "active_adapter", "default")
    return {key.replace(f".{adapter}.", "."): key for key in model.state_dict() if "lora_" in key}


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under peft's keys, as whole CPU tensors (all-gathered from shards)."""
    from torch.distributed.tensor import DTensor

    full = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            value = value.full_tensor() if isinstance(value, DTensor) else value
            full[key] = value.detach().cpu().clone()
    return dict(get_peft_model_state_dict(model, state_dict=full))


def under_model_keys(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (peft keys) under the model's own keys, as peft's `save_pretrained(state_dict=...)` wants."""
    to_model = _peft_to_model_keys(model)
    return {to_model[key]: value for key, value in state.items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the LoRA weights from whole tensors; a sharded model keeps only each rank's slice."""
    if not is_sharded(model):
        set_peft_model_state_dict(model, state)
        return
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    for key, model_key in _peft_to_model_keys(model).items():
        if key not in state:
            raise FedMKTError(f"adapter state lacks {key}. Fix: load an adapter saved for this model and LoRA config.")
        param = params[model_key]
        # src_data_rank=None: every rank already holds the whole tensor, so each cuts its own slice.
        shard = distribute_tensor(state[key].to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        with torch.no_grad():
            param.to_local().copy_(shard.to_local())
