"""The ServerApp: the unchanged `FederatedTrainer`, with clients reached through Flower Messages.

It reads the resolved config that `fedmkt fit --backend flower` saved (its path arrives as the
run config key `config-path`), builds the real server `Participant` here, waits for one SuperNode
per client, asks each which client it serves (`--node-config partition-id=N` → client_N), and
runs `FederatedTrainer.fit` over the server and one `RemoteParticipant` per client. summary.json,
the server's adapters, logs and checkpoints land in `run_dir` exactly as in-process; each client's
adapters land in its node's own output folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from lightning.pytorch.loggers import WandbLogger

from fedmkt.alignment.vocab_map import tokenizer_fingerprint
from fedmkt.cli import run_config_from_text
from fedmkt.config import RunConfig, validate
from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import PHASE_MESSAGE_TYPES, Request, decode_reply, encode_request
from fedmkt.federation.flower.proxy import (
    DEFAULT_CLIENT_TIMEOUT_S,
    STARTUP_ALLOWANCE_S,
    FlowerStages,
    RemoteParticipant,
)
from fedmkt.federation.flower.submit import check_supported
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.models import load_tokenizer
from fedmkt.run import build_participant, make_loggers, party_names, quiet_lightning

CONFIG_PATH_KEY = "config-path"
"""Run-config key (see app/pyproject.toml) holding the path of the resolved config YAML."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    config_path = str(context.run_config.get(CONFIG_PATH_KEY, ""))
    if not config_path or not Path(config_path).is_file():
        raise FedMKTError(
            f"the ServerApp cannot read the run config `{config_path}`. Fix: submit with `fedmkt fit --config X.yaml --backend flower`, "
            "and run the SuperLink on the machine (or shared file system) where run_dir lives."
        )
    serve(grid, Path(config_path).read_text())


def serve(grid: Grid, config_text: str) -> dict:
    """Run the whole federation from this ServerApp; returns the summary (also in run_dir)."""
    config = run_config_from_text(config_text)
    validate(config)
    check_supported(config)
    quiet_lightning()
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # The tokenizer each client must use: its knowledge is aligned with this one (tokenizers are not private).
    names = party_names(len(config.clients))[1:]
    tokenizers = {name: load_tokenizer(spec.model, config.cache_dir) for name, spec in zip(names, config.clients)}
    fingerprints = {name: tokenizer_fingerprint(tokenizer) for name, tokenizer in tokenizers.items()}
    nodes = find_client_nodes(grid, config, config_text, fingerprints)
    server = build_participant(config, "server")
    timeout = client_wait_s(config)
    num_public = len(server.data.public)
    clients = [
        RemoteParticipant(name, nodes[name], grid, config_text, run_dir, num_public, timeout, fingerprints[name])
        for name in names
    ]

    # What's needed, with the adapters, to reproduce a checkpoint.
    server.tokenizer.save_pretrained(run_dir / "tokenizers" / server.name)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(run_dir / "tokenizers" / name)

    loggers = make_loggers(config, run_dir)
    trainer = FederatedTrainer(server, clients, config, run_dir, loggers, run_clients=FlowerStages(config, run_dir))
    try:
        summary = trainer.fit()
    finally:
        for logger in loggers:
            logger.finalize("success")
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()
    print("\n" + trainer.results_table())
    return summary


def client_wait_s(config: RunConfig) -> float:
    """How long the server waits for one client phase: `client_timeout_s` (Flower's default if null)
    plus the time a ClientApp needs to start and rebuild its party."""
    limit = config.federation.client_timeout_s
    return (DEFAULT_CLIENT_TIMEOUT_S if limit is None else limit) + STARTUP_ALLOWANCE_S


def find_client_nodes(
    grid: Grid, config: RunConfig, config_text: str = "", tokenizers: Optional[dict[str, str]] = None
) -> dict[str, int]:
    """Client name → node id, from each connected SuperNode's partition-id.

    With `config_text` and the expected tokenizer `tokenizers`, each node also checks its own
    model's tokenizer, so a node set up with the wrong model is named before round 1.
    """
    needed = len(config.clients)
    wait_s = config.flower.wait_for_nodes_s
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < needed:
        if time.monotonic() > deadline:
            raise FedMKTError(
                f"{len(node_ids)} of the {needed} SuperNodes this config needs are connected to the SuperLink after {wait_s:.0f} s. "
                f"Fix: start one `flower-supernode --superlink HOST:PORT --node-config partition-id=N` per client (N = 0..{needed - 1}), "
                "or raise flower.wait_for_nodes_s."
            )
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())

    hello = [
        Message(
            content=encode_request(
                Request(phase="hello", client="", config_text=config_text, tokenizers=tokenizers or {})
            ),
            dst_node_id=node_id,
            message_type=PHASE_MESSAGE_TYPES["hello"],
        )
        for node_id in node_ids
    ]
    nodes: dict[str, int] = {}
    errors, duplicates = [], []
    for reply in grid.send_and_receive(hello, timeout=wait_s):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            errors.append(f"SuperNode {node_id}: {' '.join(str(reply.error.reason).split())}")
            continue
        client = decode_reply(reply.content).info["client"]
        if client in nodes:
            duplicates.append(f"SuperNodes {nodes[client]} and {node_id} both serve {client}")
        nodes[client] = node_id
    wanted = [f"client_{i}" for i in range(needed)]
    missing = [name for name in wanted if name not in nodes]
    if missing or duplicates:  # a spare node that fails or serves no client of this run is ignored
        problems = ([f"no SuperNode answered for {', '.join(missing)}"] if missing else []) + duplicates + errors
        text = "; ".join(problems)
        if "Fix:" not in text:  # a node's own refusal already says what to do
            text += (
                f". Fix: run one SuperNode per client with a distinct --node-config partition-id=N, N = 0..{needed - 1}"
            )
        raise FedMKTError(text + ("" if text.endswith(".") else "."))
    return {name: nodes[name] for name in wanted}
