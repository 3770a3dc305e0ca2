"""`launch-local --auth`: TLS, and a SuperLink that admits only the SuperNodes whose keys it registered."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedmkt.federation.flower.control_auth import write_cli_credentials  # noqa: E402
from fedmkt.federation.flower.credentials import write_local_tls, write_node_key  # noqa: E402
from fedmkt.federation.flower.local import free_ports, local_federation  # noqa: E402
from fedmkt.federation.flower.submit import flwr_executable, write_flower_home  # noqa: E402


def test_credentials_are_private_and_in_the_formats_flower_reads(tmp_path):
    tls = write_local_tls(tmp_path / "tls")
    private, public = write_node_key(tmp_path / "tls", "client_0")
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    assert tls.server_key.stat().st_mode & 0o777 == 0o600 and private.stat().st_mode & 0o777 == 0o600
    assert tls.ca_certificate.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_a_key_file_is_written_anew_never_through_a_link_or_with_an_old_mode(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("the attacker's file")
    (folder / "client_0").symlink_to(elsewhere)  # the attack: a link planted where the key goes
    loose = folder / "server.key"
    loose.write_text("old")
    loose.chmod(0o644)  # an existing file once kept its own mode
    tls = write_local_tls(folder)
    private, _ = write_node_key(folder, "client_0")
    assert elsewhere.read_text() == "the attacker's file" and not private.is_symlink()
    assert private.stat().st_mode & 0o777 == 0o600 and tls.server_key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused_and_a_registered_one_joins(tmp_path):
    if shutil.which("flower-superlink") is None:
        pytest.skip("Flower's commands are not installed")
    nodes = [{"partition-id": 0, "output-dir": str(tmp_path / "node_0")}]
    with local_federation(tmp_path, nodes, auth=True) as (link, federation):
        assert link.root_certificates is not None
        # A SuperNode with a key of its own that nobody registered, pointed at the same SuperLink.
        private, _ = write_node_key(tmp_path / "intruder", "intruder")
        env = dict(os.environ, FLWR_HOME=str(tmp_path / "intruder" / "flwr"), FLWR_TELEMETRY_ENABLED="0")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
        log = tmp_path / "intruder.log"
        with open(log, "wb") as out:
            intruder = subprocess.Popen(
                ["flower-supernode", "--root-certificates", str(link.root_certificates)]
                + ["--auth-supernode-private-key", str(private), "--superlink", link.address]
                + ["--port", str(free_ports(1)[0]), "--node-config", "partition-id=1", "--max-retries", "2"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            intruder.wait(timeout=120)
        finally:
            intruder.kill()
        assert "Failed to activate SuperNode" in log.read_text()
        # The registered node is the only one the SuperLink lists as online.
        home = tmp_path / "cli"
        from fedmkt.config import FlowerConfig

        write_flower_home(home, FlowerConfig(superlink=link.address, root_certificates=str(link.root_certificates)))
        write_cli_credentials(home, link.address, link.control_token)
        deadline = time.monotonic() + 60
        listed = ""
        while time.monotonic() < deadline and listed.count("online") < 1:
            listed = subprocess.run(
                [flwr_executable(), "supernode", "list"],
                env=dict(os.environ, FLWR_HOME=str(home)),
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            time.sleep(1)
        assert listed.count("online") == 1, listed
        federation.check_alive()


@pytest.mark.slow
def test_only_the_operator_registers_a_key_or_starts_a_run_on_the_control_api(tmp_path):
    """The attack: anyone who reached the Control API's port could register a SuperNode key and
    `flwr run` an app of their own. Without the operator's token both are refused."""
    if shutil.which("flower-superlink") is None:
        pytest.skip("Flower's commands are not installed")
    from fedmkt.config import FlowerConfig
    from fedmkt.federation.flower.submit import app_dir

    nodes = [{"partition-id": 0, "output-dir": str(tmp_path / "node_0")}]
    with local_federation(tmp_path, nodes, auth=True) as (link, _):
        flower = FlowerConfig(superlink=link.address, root_certificates=str(link.root_certificates))
        stranger, operator = tmp_path / "stranger", tmp_path / "operator"
        write_flower_home(stranger, flower)  # knows the address and the CA, not the token
        write_flower_home(operator, flower)
        write_cli_credentials(operator, link.address, link.control_token)
        _, public = write_node_key(tmp_path / "keys", "intruder")

        def flwr(home, *arguments):
            env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
            done = subprocess.run([flwr_executable(), *arguments], env=env, capture_output=True, text=True, timeout=120)
            return done.returncode, done.stdout + done.stderr

        code, said = flwr(stranger, "supernode", "register", str(public))
        assert code != 0 and "registered successfully" not in said and "Authentication failed" in said, said
        code, said = flwr(stranger, "run", str(app_dir()), "fedmkt")
        assert code != 0 and "Successfully started run" not in said, said
        code, said = flwr(operator, "supernode", "list")  # the operator's own token: admitted
        assert code == 0 and "Authentication failed" not in said, said
        assert link.control_token.stat().st_mode & 0o777 == 0o600


def _acquire_task(port: int) -> int:
    """What a stranger on this machine gets when it asks a Runtime API for a pending app task (and
    the token that acts for it) the way Flower's SuperExec does, without the SuperExec's secret."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/runtime/acquire-task",
        content=AcquireTaskRequest().SerializeToString(),
        headers={"content-type": "application/protobuf"},
        timeout=30,
    )
    return response.status_code


@pytest.mark.slow
def test_a_stranger_cannot_take_the_apps_tasks_from_the_runtime_api(tmp_path):
    """The attack: in Flower's default subprocess mode the SuperLink's and each SuperNode's Runtime
    API hands a pending ServerApp or ClientApp task, with its token, to any caller (status 200);
    whoever takes it runs the operator's run with code of their own. Each now answers only the
    SuperExec that holds its secret."""
    if shutil.which("flower-superlink") is None:
        pytest.skip("Flower's commands are not installed")
    nodes = [{"partition-id": 0, "output-dir": str(tmp_path / "node_0")}]
    with local_federation(tmp_path, nodes) as (link, federation):
        link_port = int(link.address.rsplit(":", 1)[1])
        node_port = int(_command_of(federation, "client_0")[0])
        _wait_for_port(node_port)
        assert _acquire_task(link_port) == 401
        assert _acquire_task(node_port) == 401
        federation.check_alive()  # the SuperExecs we started, with the secrets, are up
        secrets = sorted((tmp_path / "nodes" / "credentials").glob("superexec_*.secret"))
        assert [path.name for path in secrets] == ["superexec_client_0.secret", "superexec_superlink.secret"]
        assert all(path.stat().st_mode & 0o777 == 0o600 for path in secrets)


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port}")


def _command_of(federation, name: str) -> list[str]:
    """The arguments after `--port` in the command line of the process `name` (its Runtime API port first)."""
    import psutil

    process = next(process for label, process in federation.processes if label == name)
    arguments = psutil.Process(process.pid).cmdline()
    return arguments[arguments.index("--port") + 1 :]
