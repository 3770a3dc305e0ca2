"""The ServerApp: the unchanged `FederatedTrainer`, with clients reached through Flower Messages.

It reads the resolved config that `fedmkt fit --backend flower` saved (its path arrives as the
run config key `config-path`), builds the real server `Participant` here, waits for one SuperNode
per client, asks each which client it serves (`--node-config partition-id=N` → client_N), and
runs `FederatedTrainer.fit` over the server and one `RemoteParticipant` per client. summary.json,
the server's adapters, logs and checkpoints land in `run_dir` exactly as in-process; each client's
adapters land in its node's own output folder.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmkt.alignment.vocab_map import tokenizer_fingerprint
from fedmkt.config import RunConfig, run_config_from_text, validate
from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.discovery import find_client_nodes
from fedmkt.federation.flower.proxy import (
    DEFAULT_CLIENT_TIMEOUT_S,
    STARTUP_ALLOWANCE_S,
    FlowerStages,
    RemoteParticipant,
)
from fedmkt.federation.flower.submit import check_supported
from fedmkt.federation.parties import build_participant, quiet_lightning, save_tokenizers
from fedmkt.federation.rounds import run_rounds
from fedmkt.federation.run_folder import resume_state
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.models import load_tokenizer
from fedmkt.received import payload_byte_limit

CONFIG_PATH_KEY = "config-path"
"""Run-config key (see app/pyproject.toml) holding the path of the resolved config YAML."""

RESUME_KEY = "resume"
"""Run-config key: true continues the run in run_dir from its last round checkpoint."""

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
    serve(grid, Path(config_path).read_text(), resume=bool(context.run_config.get(RESUME_KEY, False)))


def serve(grid: Grid, config_text: str, resume: bool = False) -> dict:
    """Run the whole federation from this ServerApp; returns the summary (also in run_dir).

    With `resume`, the run continues after the last round checkpoint in run_dir: the server loads
    its adapter from there, and each client's node its own from its output folder, checked against
    the hash the checkpoint recorded.
    """
    config = run_config_from_text(config_text)
    validate(config)
    check_supported(config)
    quiet_lightning()
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_state(config, str(run_dir)) if resume else None

    # The tokenizer each client must use: its knowledge is aligned with this one (tokenizers are not private).
    names = list(config.parties())[1:]
    tokenizers = {name: load_tokenizer(spec.model, config.cache_dir) for name, spec in zip(names, config.clients)}
    fingerprints = {name: tokenizer_fingerprint(tokenizer) for name, tokenizer in tokenizers.items()}
    nodes = find_client_nodes(grid, config, config_text, fingerprints)
    server = build_participant(config, "server")
    timeout = client_wait_s(config)
    num_public = server.num_public
    clients = [
        RemoteParticipant(
            name,
            nodes[name],
            grid,
            config_text,
            run_dir,
            num_public,
            timeout,
            fingerprints[name],
            max_payload_bytes=payload_byte_limit(num_public, config.data.max_length, config.transfer.top_k),
        )
        for name in names
    ]

    save_tokenizers(run_dir, {server.name: server.tokenizer, **tokenizers})
    trainer = FederatedTrainer(server, clients, config, run_dir, run_clients=FlowerStages(config, run_dir))
    return run_rounds(trainer, config, run_dir, state)


def client_wait_s(config: RunConfig) -> float:
    """How long the server waits for one client phase: `client_timeout_s` (Flower's default if null)
    plus the time a node needs to start its worker and build its party."""
    limit = config.federation.client_timeout_s
    return (DEFAULT_CLIENT_TIMEOUT_S if limit is None else limit) + STARTUP_ALLOWANCE_S
