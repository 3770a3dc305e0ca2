"""A SuperNode runs the fedmkt app its own installation builds and the apps its policy trusts, no other."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from flwr.cli.build import build_fab_from_disk  # noqa: E402

from fedmkt.errors import FedMKTError  # noqa: E402
from fedmkt.federation.flower import app_trust  # noqa: E402
from fedmkt.federation.flower.app_trust import app_dir, check_app  # noqa: E402


def _changed_app(tmp_path: Path) -> bytes:
    """fedmkt's app with one line of the server's own in its ClientApp module, built as `flwr run` does."""
    app = tmp_path / "app"
    shutil.copytree(app_dir(), app)
    client = app / "fedmkt_app" / "client_app.py"
    client.write_text(client.read_text() + "\nimport os  # the server's own line\n")
    return build_fab_from_disk(app)


def test_a_changed_app_is_refused_in_one_line_naming_both_hashes(tmp_path):
    fab = _changed_app(tmp_path)
    digest = hashlib.sha256(fab).hexdigest()
    with pytest.raises(FedMKTError) as refused:
        check_app(fab, {"partition-id": 0})
    said = str(refused.value)
    assert "\n" not in said and digest in said and app_trust.own_app_sha256() in said and "trusted-apps" in said
    check_app(build_fab_from_disk(app_dir()), {"partition-id": 0})  # the node's own app runs


def test_trusted_apps_admits_the_listed_hashes_as_a_list_or_a_string(tmp_path):
    fab = _changed_app(tmp_path)
    digest = hashlib.sha256(fab).hexdigest()
    check_app(fab, {"partition-id": 0, "trusted-apps": digest.upper()})
    settings = tmp_path / "node.yaml"
    settings.write_text(f"partition-id: 0\ntrusted-apps: [{'a' * 64}, {digest}]\n")
    check_app(fab, {"settings": str(settings)})
    with pytest.raises(FedMKTError, match="trusted-apps holds 'abc', not a sha256"):
        check_app(fab, {"partition-id": 0, "trusted-apps": "abc"})


def test_install_checks_the_app_before_flower_installs_it(monkeypatch, tmp_path):
    """The ClientApp process's pull step refuses a foreign FAB, so Flower never reaches install_from_fab."""
    from flwr.supernode.runtime import run_clientapp

    foreign = SimpleNamespace(content=_changed_app(tmp_path))
    context = SimpleNamespace(node_config={"partition-id": 0})
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: ("message", context, "run", foreign))
    app_trust.install()
    app_trust.install()  # a second install keeps one check
    with pytest.raises(FedMKTError, match="runs only the fedmkt app"):
        run_clientapp.pull_task_input(None)
    own = SimpleNamespace(content=build_fab_from_disk(app_dir()))
    monkeypatch.setattr(run_clientapp, "pull_task_input", lambda client: ("message", context, "run", own))
    app_trust.install()
    assert run_clientapp.pull_task_input(None)[3] is own


FOREIGN_SERVER = """
import time
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes, deadline = [], time.time() + 90
    while len(nodes) < 2 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    list(grid.send_and_receive(messages, timeout=180))
"""

FOREIGN_CLIENT = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    Path({markers!r}, "ran_on_node_%s" % context.node_config["partition-id"]).write_text("the server's code ran here")
    return Message(RecordDict(), reply_to=message)
"""


def _foreign_app(folder: Path, markers: Path) -> Path:
    """A Flower app of the server's own whose ClientApp leaves a file where it runs."""
    (folder / "foreign").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "foreign"
            version = "1.0.0"
            dependencies = ["flwr>=1.42"]

            [tool.flwr.app]
            publisher = "stranger"

            [tool.flwr.app.components]
            serverapp = "foreign.server:app"
            clientapp = "foreign.client:app"
            """
        )
    )
    (folder / "foreign" / "__init__.py").write_text("")
    (folder / "foreign" / "server.py").write_text(FOREIGN_SERVER)
    (folder / "foreign" / "client.py").write_text(FOREIGN_CLIENT.format(markers=str(markers)))
    return folder


@pytest.mark.slow
def test_a_node_runs_no_code_of_an_app_it_does_not_trust(tmp_path):
    """The attack: whoever starts a run chooses its ClientApp, whose code ran on every SuperNode next
    to its private data. Node 0 (default policy) refuses the server's own app before any of its code
    runs; node 1, whose trusted-apps lists that app's hash, runs it (so the attack is real)."""
    if shutil.which("flower-superlink") is None:
        pytest.skip("Flower's commands are not installed")
    from fedmkt.config import FlowerConfig
    from fedmkt.federation.flower.control_auth import write_cli_credentials
    from fedmkt.federation.flower.local import local_federation
    from fedmkt.federation.flower.submit import flwr_executable, write_flower_home

    markers = tmp_path / "markers"
    markers.mkdir()
    foreign = _foreign_app(tmp_path / "foreign_app", markers)
    digest = hashlib.sha256(build_fab_from_disk(foreign)).hexdigest()
    nodes = [
        {"partition-id": 0, "output-dir": str(tmp_path / "node_0")},
        {"partition-id": 1, "output-dir": str(tmp_path / "node_1"), "trusted-apps": [digest]},
    ]
    with local_federation(tmp_path, nodes) as (link, federation):
        operator = tmp_path / "operator"
        write_flower_home(operator, FlowerConfig(superlink=link.address, insecure=True))
        write_cli_credentials(operator, link.address, link.control_token)
        env = dict(os.environ, FLWR_HOME=str(operator), FLWR_TELEMETRY_ENABLED="0")
        done = subprocess.run(
            [flwr_executable(), "run", str(foreign), "fedmkt"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 240
        refused = ""
        while time.monotonic() < deadline and not (
            (markers / "ran_on_node_1").exists() and (digest in refused or (markers / "ran_on_node_0").exists())
        ):
            refused = "".join(path.read_text(errors="replace") for path in federation.logs.glob("client_0*.log"))
            time.sleep(1)
        assert (markers / "ran_on_node_1").exists(), "the trusting node did not run the app"
        assert digest in refused and "runs only the fedmkt app" in refused
        assert not (markers / "ran_on_node_0").exists()
        federation.check_alive()


def test_commands_writes_into_a_new_folder_and_refuses_to_replace_a_users_own_files(tmp_path, capsys):
    folder = tmp_path / "bin"
    assert app_trust.main(["commands", str(folder)]) == 0
    assert "app_trust import install" in (folder / "flwr-clientapp").read_text()
    assert app_trust.main(["commands", str(folder)]) == 0  # an earlier `commands` folder is rewritten
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "flwr").write_text("the user's own flwr")
    capsys.readouterr()
    assert app_trust.main(["commands", str(theirs)]) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "already holds flwr" in said and "Fix:" in said
    assert (theirs / "flwr").read_text() == "the user's own flwr" and sorted(p.name for p in theirs.iterdir()) == [
        "flwr"
    ]
