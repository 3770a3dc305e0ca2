"""Finding the SuperNode of each client: ask every connected node which partition it serves.

A node answers `hello` with its client (`--node-config partition-id=N` → client_N) after
checking, when the run sends them, that its own model has the tokenizer the run expects. The
ServerApp asks once before round 1 (every client must have a node), and again when a client's
node has left the SuperLink, so a SuperNode restarted with the same partition-id is found again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Optional

from flwr.app import Message
from flwr.serverapp import Grid

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.messages import PHASE_MESSAGE_TYPES, Request, decode_reply, encode_request, exchange


def ask_nodes(
    grid: Grid, node_ids: Iterable[int], config_text: str, tokenizers: dict[str, str], timeout_s: float
) -> tuple[dict[str, int], list[str], list[str]]:
    """(client → node id, the nodes' refusals, clients served twice) from one `hello` to each node."""
    hello = [
        Message(
            content=encode_request(Request(phase="hello", client="", config_text=config_text, tokenizers=tokenizers)),
            dst_node_id=node_id,
            message_type=PHASE_MESSAGE_TYPES["hello"],
        )
        for node_id in node_ids
    ]
    if not hello:
        return {}, [], []
    nodes: dict[str, int] = {}
    errors, duplicates = [], []
    for reply in exchange(grid, hello, timeout_s):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            errors.append(f"SuperNode {node_id}: {' '.join(str(reply.error.reason).split())}")
            continue
        client = decode_reply(reply.content).info["client"]
        if client in nodes:
            duplicates.append(f"SuperNodes {nodes[client]} and {node_id} both serve {client}")
        nodes[client] = node_id
    return nodes, errors, duplicates


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

    nodes, errors, duplicates = ask_nodes(grid, node_ids, config_text, tokenizers or {}, wait_s)
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
