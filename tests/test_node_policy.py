"""A Flower node's own policy: the server's run config must fit it before the node opens any model or file."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr")

from fedmkt.config import DataSource, parse_run_config, shipped_configs  # noqa: E402
from fedmkt.errors import FedMKTError  # noqa: E402
from fedmkt.federation.flower import client_phases  # noqa: E402
from fedmkt.federation.flower.messages import Request  # noqa: E402
from fedmkt.federation.flower.node import apply_to_config, content_sha256, node_settings  # noqa: E402


def run_config(*overrides: str):
    return parse_run_config(["--config", "tiny", *overrides])


def settings(tmp_path, **keys):
    return node_settings({"partition-id": 0, "output-dir": str(tmp_path / "out"), **keys})


def refused(settings_, config, *needles):
    with pytest.raises(FedMKTError) as error:
        apply_to_config(settings_, config)
    message = str(error.value)
    assert message.startswith("client_0's node refuses this run:") and "Fix:" in message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_remote_code_runs_only_where_the_node_allows_it(tmp_path):
    config = run_config("--server.model.trust_remote_code", "true")
    refused(settings(tmp_path), config, "server.model.trust_remote_code is true", "allow-remote-code")
    assert apply_to_config(settings(tmp_path, **{"allow-remote-code": "true"}), config).server.model.trust_remote_code


def test_a_node_model_source_takes_neither_revision_nor_remote_code_from_the_server(tmp_path):
    config = run_config("--clients", '[{"model": {"source": "x", "revision": "evil-branch"}}]')
    own = apply_to_config(settings(tmp_path, model="embedded:smollm2-135m-instruct"), config).clients[0].model
    assert (own.source, own.revision, own.trust_remote_code) == ("embedded:smollm2-135m-instruct", None, False)


def test_the_server_cannot_point_the_shared_sets_at_a_node_file(tmp_path):
    private = tmp_path / "private.jsonl"  # the attack: the node's private file, named as the public set
    private.write_text('{"prompt": "secret", "choices": [" a", " b"], "answer": 0}\n')
    config = run_config("--data.public", f'{{"path": "{private}"}}', "--data.task", "null")
    config.data.eval = DataSource(path="embedded:arc_easy")
    message = refused(settings(tmp_path, data=str(private)), config, f"data.public names {private}")
    assert "secret" not in message
    config = run_config("--data.data_dir", str(tmp_path))
    refused(settings(tmp_path), config, "data.data_dir names")


def test_a_listed_shared_file_is_read_only_with_the_content_it_had(tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text('{"prompt": "Q", "choices": [" a", " b"], "answer": 0}\n')
    policy = {"public": str(public), "public-sha256": content_sha256(public)}
    config = run_config("--data.public", f'{{"path": "{public}"}}')
    assert apply_to_config(settings(tmp_path, **policy), config).data.public.path == str(public)
    public.write_text('{"prompt": "Q2", "choices": [" a", " b"], "answer": 1}\n')  # changed since
    refused(settings(tmp_path, **policy), config, "no longer has the content digest")


def test_sizes_and_epochs_over_the_node_limits_are_refused(tmp_path):
    limits = {"max-length": 64, "max-batch-size": 2, "max-epochs": 1}
    refused(
        settings(tmp_path, **limits),
        run_config(),
        "data.max_length 96 > this node's max-length 64",
        "clients[0].batch_size 4 > this node's max-batch-size 2",
        "clients[0].eval_batch_size 16 > this node's max-batch-size 2",
    )
    config = run_config("--data.max_length", "64")
    client = config.clients[0]
    config.clients[0] = dataclasses.replace(client, batch_size=2, eval_batch_size=2, distill_epochs=3)
    refused(settings(tmp_path, **limits), config, "clients[0].distill_epochs 3 > this node's max-epochs 1")


def test_the_node_sets_its_own_noise_floor_and_cache(tmp_path):
    config = run_config("--privacy.logit_noise", "0.5", "--cache_dir", "/server/chosen")
    applied = apply_to_config(settings(tmp_path, **{"min-logit-noise": 2.0, "cache-dir": str(tmp_path / "c")}), config)
    assert applied.privacy.logit_noise == 2.0 and applied.cache_dir == str(tmp_path / "c")
    assert apply_to_config(settings(tmp_path), config).privacy.logit_noise == 0.5  # the run's, when higher
    assert apply_to_config(settings(tmp_path), config).cache_dir is None  # never the server's path


def test_adapter_weights_leave_only_a_node_that_joined_fedavg_in_a_fedavg_run(tmp_path):
    refused(settings(tmp_path), run_config("--federation.mode", "fedavg"), "does not send its adapter weights")
    apply_to_config(settings(tmp_path, fedavg="true"), run_config("--federation.mode", "fedavg"))
    # In a fedmkt run the node refuses a request for its weights before it builds anything.
    request = Request(phase="adapter_state", client="client_0", config_text=shipped_configs()["tiny.yaml"].read_text())
    with pytest.raises(FedMKTError, match="adapter weights only in a fedavg run"):
        client_phases.answer(request, settings(tmp_path), {"adapter": b""}, 1, client_phases.PartyCache())
    # Nor does it take weights in: a server could otherwise overwrite the node's adapter at will.
    request = dataclasses.replace(request, phase="load_adapter_state")
    with pytest.raises(FedMKTError, match="takes in adapter weights only in a fedavg run"):
        client_phases.answer(request, settings(tmp_path), {"adapter": b""}, 1, client_phases.PartyCache())


def test_the_node_owns_privacy_whatever_the_server_asks(tmp_path):
    """The attacks: a server switches DP off, asks epsilon = 1e6, or widens top-k and the clip."""
    strict = settings(
        tmp_path, **{"require-dp": "true", "max-dp-epsilon": "8", "max-dp-delta": "1e-5", "max-top-k": "16", "max-logit-clip": "10"}
    )  # fmt: skip
    refused(strict, run_config(), "privacy.dp.enabled is false")
    dp = ["--privacy.dp.enabled", "true", "--privacy.dp.target_epsilon"]
    refused(strict, run_config(*dp, "1e6"), "target_epsilon 1000000.0 > this node's max-dp-epsilon 8.0")
    refused(
        strict,
        run_config("--privacy.dp.enabled", "true", "--privacy.dp.noise_multiplier", "0.01"),
        "cannot bound epsilon before it reads its data",
    )
    refused(strict, run_config(*dp, "4", "--privacy.dp.delta", "0.1"), "delta 0.1 > this node's max-dp-delta")
    refused(strict, run_config(*dp, "4", "--transfer.top_k", "64"), "top_k 64 > this node's max-top-k 16")
    refused(
        strict, run_config(*dp, "4", "--privacy.logit_clip", "1e4"), "logit_clip 10000.0 > this node's max-logit-clip"
    )
    applied = apply_to_config(strict, run_config(*dp, "4"))
    assert applied.privacy.dp.enabled and applied.privacy.dp.target_epsilon == 4
    # Setting only a cap on epsilon requires DP as well (no DP spends an unbounded epsilon).
    refused(settings(tmp_path, **{"max-dp-epsilon": "8"}), run_config(), "privacy.dp.enabled is false")
    apply_to_config(settings(tmp_path), run_config())  # no such keys: the run's own choice, as before


def test_bad_policy_values_are_one_line_errors(tmp_path):
    for keys, needle in (
        ({"max-length": "0"}, "max-length"),
        ({"min-logit-noise": "-1"}, "min-logit-noise"),
        ({"fedavg": "maybe"}, "fedavg"),
        ({"max-dp-epsilon": "0"}, "max-dp-epsilon"),
        ({"max-logit-clip": "inf"}, "max-logit-clip"),
        ({"max-top-k": "0"}, "max-top-k"),
        ({"require-dp": "sure"}, "require-dp"),
        ({"public-sha256": "abc"}, "public-sha256 is set without public"),
    ):
        with pytest.raises(FedMKTError, match=needle):
            settings(tmp_path, **keys)


def test_policy_keys_are_dataclass_fields_of_the_settings(tmp_path):
    policy = settings(tmp_path).policy
    assert dataclasses.asdict(policy)["allow_remote_code"] is False and policy.max_epochs == 20


def test_the_runs_model_settings_for_a_client_do_not_bind_a_node_that_names_its_own(tmp_path):
    config = run_config()
    config.clients[0] = dataclasses.replace(
        config.clients[0], model=dataclasses.replace(config.clients[0].model, trust_remote_code=True)
    )
    refused(settings(tmp_path), config, "clients[0].model.trust_remote_code is true")
    own = apply_to_config(settings(tmp_path, model="embedded:smollm2-135m-instruct"), config)
    assert own.clients[0].model.trust_remote_code is False


def test_launch_local_gives_its_nodes_a_policy_that_admits_its_own_run(tmp_path):
    import yaml

    from fedmkt.federation.flower.local import split_config

    data = yaml.safe_load(shipped_configs()["tiny.yaml"].read_text())
    for client in data["clients"]:
        client["local_epochs"] = 40  # more than a node admits by default
    shared, nodes = split_config(yaml.safe_dump(data), tmp_path / "run")
    config = run_config()
    config.clients = [dataclasses.replace(c, local_epochs=40) for c in config.clients]
    for node in nodes:
        assert node["max-epochs"] == 40 and node["fedavg"] is False
        apply_to_config(node_settings(node), config)  # admitted
    refused(
        settings(tmp_path), config, "clients[0].local_epochs 40 > this node's max-epochs 20"
    )  # a default node is not
