"""Bytes on the wire per round per client: FedMKT's knowledge payloads vs FedAvg of the same LoRA
adapters vs full-model FedAvg.

Loads the config's parties (real models for `demo`), and for each client measures, from real
objects rather than formulas:
  * FedMKT: its own payload (top-k logits on the public data, serialised exactly as sent) up, the
    server's payload down;
  * LoRA FedAvg: its adapter (safetensors) up and the averaged adapter down;
  * full-model FedAvg: every weight of its model, in the dtype it trains in and in bf16, up and down.
The paper-scale line extrapolates FedMKT's measured bytes per token position to the paper's own
example exchange (1,000 public samples × 512 tokens × top-16).

    python benchmarks/communication.py                 # demo.yaml: Gemma-3-270M server, 2× SmolLM2-135M
    python benchmarks/communication.py --config tiny   # seconds, tiny random-init models
"""

from __future__ import annotations

import argparse

from safetensors.torch import save as save_safetensors

from fedmkt.config import parse_run_config
from fedmkt.federation.parties import build_participants, quiet_lightning

PAPER_POSITIONS = 1000 * 512


def _mb(size: float) -> str:
    return f"{size / 1e6:,.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    args = parser.parse_args()
    quiet_lightning()
    config = parse_run_config(["--config", args.config, "--logging.wandb", "false"])
    server, clients = build_participants(config)
    server_knowledge = server.share_knowledge(round_index=1)
    server_payload = server_knowledge.to_bytes()

    rows = []
    for client in clients:
        payload = client.share_knowledge(round_index=1)
        fedmkt = len(payload.to_bytes()) + len(server_payload)
        adapter = len(save_safetensors({k: v.contiguous() for k, v in client.adapter_state().items()}))
        parameters = list(client.module.model.parameters())
        full = sum(p.numel() * p.element_size() for p in parameters)
        full_bf16 = sum(p.numel() * 2 for p in parameters)
        rows.append((client.name, fedmkt, 2 * adapter, 2 * full, 2 * full_bf16, payload))

    positions = len(payload.token_ids)
    print(
        f"config {args.config}: {len(server.data.public)} public samples, {positions} token positions per client payload, top-k {config.transfer.top_k}"
    )
    print()
    print(
        "| client | FedMKT (MB) | LoRA FedAvg (MB) | full FedAvg, train dtype (MB) | full FedAvg, bf16 (MB) | LoRA / FedMKT | full / FedMKT |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, fedmkt, lora, full, full_bf16, _ in rows:
        print(
            f"| {name} | {_mb(fedmkt)} | {_mb(lora)} | {_mb(full)} | {_mb(full_bf16)} | {lora / fedmkt:.1f}× | {full / fedmkt:,.0f}× |"
        )
    name, fedmkt, lora, full, full_bf16, payload = rows[0]
    per_position_up = len(payload.to_bytes()) / positions
    per_position_down = len(server_payload) / len(server_knowledge.token_ids)
    paper = (per_position_up + per_position_down) * PAPER_POSITIONS
    print()
    print(
        f"Paper-scale exchange (1,000 × 512 positions, top-{config.transfer.top_k}): "
        f"{per_position_up:.0f} B/position up + {per_position_down:.0f} B/position down = {_mb(paper)} MB per client per round, "
        f"against {_mb(lora)} MB for LoRA FedAvg and {_mb(full)} MB for full-model FedAvg of {name}."
    )


if __name__ == "__main__":
    main()
