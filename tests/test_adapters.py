"""LoRA adapter state of whole and FSDP2-sharded models (2 gloo processes for the sharded case)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedmkt.adapters import adapter_state, is_sharded, load_adapter_state, under_model_keys
from fedmkt.errors import FedMKTError


def _lora_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero; make every adapter tensor distinct
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param))
    return model


def test_whole_model_round_trip_and_keys():
    model = _lora_model()
    state = adapter_state(model)
    assert not is_sharded(model)
    assert state and all(".default." not in key and "lora_" in key for key in state)
    assert set(under_model_keys(model, state)) == {k for k in model.state_dict() if "lora_" in k}
    other = _lora_model(seed=1)
    load_adapter_state(other, state)
    assert all(torch.equal(adapter_state(other)[k], state[k]) for k in state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, port: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _lora_model()
        whole = adapter_state(model)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        gathered = adapter_state(model)
        changed = {k: v * 2 + 1 for k, v in whole.items()}
        load_adapter_state(model, changed)
        results[rank] = {
            "sharded": is_sharded(model),
            "local_rows": {n: p.to_local().shape[0] for n, p in lora.items()},
            "full_rows": {n: p.shape[0] for n, p in lora.items()},
            "gathered_equals_whole": gathered.keys() == whole.keys()
            and all(torch.equal(gathered[k], whole[k]) for k in whole),
            "reload_equals_changed": all(torch.equal(adapter_state(model)[k], changed[k]) for k in changed),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_gathers_whole_tensors_and_loads_each_ranks_slice():
    results = mp.Manager().dict()
    mp.spawn(_sharded_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        out = results[rank]
        assert out["sharded"]
        # Each rank holds half of every LoRA tensor's rows (dim-0 shards), yet reads whole tensors.
        assert all(out["local_rows"][n] * 2 == out["full_rows"][n] for n in out["full_rows"])
        assert out["gathered_equals_whole"] and out["reload_equals_changed"]


def test_loading_an_adapter_for_another_model_is_refused_when_sharded(monkeypatch):
    model = _lora_model()
    monkeypatch.setattr("fedmkt.adapters.is_sharded", lambda m: True)
    with pytest.raises(FedMKTError, match="adapter state lacks"):
        load_adapter_state(model, {})
