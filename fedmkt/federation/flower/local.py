"""`fedmkt launch-local`: a whole Flower federation on this machine, one SuperNode per client.

It starts a SuperLink and one SuperNode per client on 127.0.0.1, each with the node settings the
config gives that client (its private data, own evaluation set, output folder) and, with `--gpus`,
pinned to one GPU through CUDA_VISIBLE_DEVICES; then it submits the run like `fedmkt fit --backend
flower`, streams its log, and stops everything it started when the run ends, fails or is
interrupted. The run goes through the same engine as a federation over several machines: the
shared config the SuperLink receives names no client's private data.

The SuperLink and every SuperNode run in Flower's process isolation, each beside a SuperExec that
holds its secret (no other caller gets their apps' tasks), and each SuperNode beside a ClientApp
server that forks its ClientApp processes (`clientapp_server`); the Flower commands they run come
from `run_dir/nodes/bin/`, with fedmkt's checks in place (`control_auth`, `app_trust`, `polling`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional

import psutil
import yaml

from fedmkt.config import FlowerConfig, RunConfig, run_config_from_text, validate
from fedmkt.data.parts import federation_data
from fedmkt.errors import FedMKTError, RunInterrupted
from fedmkt.federation.checkpoint import check_resumable, read_checkpoint
from fedmkt.federation.flower.clientapp_server import SERVER_ENV, launcher_script
from fedmkt.federation.flower.control_auth import TOKEN_ENV, write_cli_credentials, write_token
from fedmkt.federation.flower.credentials import (
    _private_folder,
    write_local_tls,
    write_node_key,
    write_superexec_secret,
)
from fedmkt.federation.flower.node import NodePolicy, apply_to_config, content_sha256, node_settings
from fedmkt.federation.flower.polling import superexec_env
from fedmkt.federation.flower.submit import flwr_executable, submit, write_flower_home
from fedmkt.federation.flower.worker import stop_workers
from fedmkt.federation.run_folder import claim_run_dir
from fedmkt.vocabulary_sizes import validate_against_vocabularies

NODE_FILE = "node.yaml"
"""Each client's node settings, written to `<run_dir>/nodes/client_N/node.yaml`."""

_PRIVATE_KEYS = ("data", "eval")


def split_config(resolved: str, run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(the shared run config, one node-settings mapping per client) from a full resolved config.

    The clients' private sources move to their nodes' settings (relative paths made absolute, as a
    node may start elsewhere); each node writes into `run_dir`, as an in-process run would. The
    user who launches every node on this machine is every node's operator, so each node's policy
    lists the shared files the run names, with their content digests as they are now.
    """
    data = yaml.safe_load(resolved)
    shared = _shared_files(data.get("data") or {})
    nodes = []
    for index, client in enumerate(data.get("clients") or []):
        settings: dict[str, Any] = {"partition-id": index, "output-dir": str(run_dir), "run-dir": str(run_dir)} | shared
        settings |= _policy_for_the_run(data, client)
        for key in _PRIVATE_KEYS:
            source = client.pop(key, None)
            if source:
                settings[key] = _absolute_source(source)
        nodes.append(settings)
    return yaml.safe_dump(data, sort_keys=False), nodes


def _policy_for_the_run(data: dict, client: dict) -> dict[str, Any]:
    """Node policy limits that admit what the run config asks of this client (its operator wrote that
    config), never lower than the node defaults."""
    defaults = NodePolicy()
    model = client.get("model") or {}
    server_model = (data.get("server") or {}).get("model") or {}
    return {
        "max-length": max(defaults.max_length, int((data.get("data") or {}).get("max_length") or 0)),
        "max-batch-size": max(
            defaults.max_batch_size, *(int(client.get(k) or 0) for k in ("batch_size", "eval_batch_size"))
        ),
        "max-epochs": max(defaults.max_epochs, *(int(client.get(k) or 0) for k in ("local_epochs", "distill_epochs"))),
        "allow-remote-code": bool(model.get("trust_remote_code") or server_model.get("trust_remote_code")),
        "fedavg": (data.get("federation") or {}).get("mode") == "fedavg",
    }


def _shared_files(data: dict) -> dict[str, str]:
    """Node policy entries (`public`, `shared-eval`, `data-dir` and their `-sha256`) for the shared
    files and folders of a run config's `data` section that exist on this machine."""
    named = {
        "public": (data.get("public") or {}).get("path"),
        "shared-eval": (data.get("eval") or {}).get("path"),
        "data-dir": data.get("data_dir"),
    }
    policy = {}
    for key, path in named.items():
        if path and not str(path).startswith(("embedded:", "hub:")) and Path(str(path)).expanduser().exists():
            policy[key] = str(path)
            policy[f"{key}-sha256"] = content_sha256(Path(str(path)).expanduser())
    return policy


def _absolute_source(source: dict) -> dict:
    path = str(source.get("path", ""))
    if path and ":" not in path.split("/", 1)[0] and Path(path).expanduser().exists():
        source = dict(source, path=str(Path(path).expanduser().resolve()))
    return source


def gpu_assignment(gpus: Optional[str], num_clients: int) -> tuple[Optional[str], list[Optional[str]]]:
    """(the server's GPU, each client's GPU) from `--gpus 0,1,…`: the server takes the first, the
    clients the following ones in turn (wrapping around). None: no pinning."""
    if gpus is None:
        return None, [None] * num_clients
    ids = [part.strip() for part in str(gpus).split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise FedMKTError(f"--gpus {gpus!r} is not a list of GPU indices. Fix: e.g. --gpus 0,1 (see nvidia-smi).")
    return ids[0], [ids[(index + 1) % len(ids)] for index in range(num_clients)]


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


FLOWER_COMMANDS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr",
)
"""The Flower commands a local federation runs; the SuperLink and SuperNodes start the apps by name."""


def bind_flower_commands(folder: Path) -> Path:
    """Write `folder/<command>` for each Flower command, running it with this Python interpreter.

    A `flower-superlink` found on PATH may belong to another environment (a pyenv shim, a system
    install) whose ServerApp and ClientApp would import another fedmkt; with `folder` first on PATH,
    every process of the federation, and the apps they spawn, runs the fedmkt of this command.
    """
    scripts = {entry.name: entry for entry in entry_points(group="console_scripts") if entry.name in FLOWER_COMMANDS}
    missing = [name for name in FLOWER_COMMANDS if name not in scripts]
    if missing:
        raise FedMKTError(
            f"Flower's {', '.join(missing)} command(s) are not installed for {sys.executable}. "
            "Fix: `pip install 'flwr>=1.42'` in the environment fedmkt runs in."
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in scripts.items():
        module, _, attribute = entry.value.partition(":")
        script = folder / name
        # The SuperLink admits Control API requests only with the operator's token (`control_auth`);
        # a ClientApp process runs only the apps its node trusts (`app_trust`); a SuperNode asks
        # for messages every fraction of a second (`polling`).
        # `flwr-clientapp` hands its work to the node's ClientApp server where one runs (`clientapp_server`).
        guard = {
            "flower-superlink": "from fedmkt.federation.flower.control_auth import install\ninstall()\n",
            "flower-supernode": "from fedmkt.federation.flower.polling import install\ninstall()\n",
        }.get(name, "")
        script.write_text(
            launcher_script(sys.executable)
            if name == "flwr-clientapp"
            else f"#!{sys.executable}\nimport sys\n{guard}from {module} import {attribute.split('.')[0]} as main\n"
            f"sys.argv[0] = {name!r}\nsys.exit(main())\n"
        )
        script.chmod(0o755)
    return folder


class LocalFederation:
    """The processes `launch-local` started; `stop` ends each of them (and its children) by its own id."""

    def __init__(self, logs: Path, output_dirs: Sequence[Path] = ()) -> None:
        self.logs = logs
        self.output_dirs = list(output_dirs)
        """The nodes' output folders, where their SuperNodes' workers are found (`worker.py`)."""
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.watchdog: Optional[subprocess.Popen] = None
        """Ends every started process if this one dies without stopping them (`watchdog.py`)."""
        self.folders: list[Path] = []
        """Private folders of the processes' sockets, removed by `stop`."""

    def private_folder(self, prefix: str) -> Path:
        """A new folder of mode 0700 (short, for a Unix socket's path) that `stop` removes."""
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.folders.append(folder)
        return folder

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.processes.append((name, process))
        return process

    def watch(self) -> None:
        """Start the watchdog over every process started so far (in a session of its own, so that
        whatever kills this process's group spares it)."""
        pids = [str(process.pid) for _, process in self.processes]
        command = [sys.executable, "-m", "fedmkt.federation.flower.watchdog", str(os.getpid()), *pids]
        with open(self.logs / "watchdog.log", "wb") as log:
            self.watchdog = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [
                    "no output"
                ]
                raise FedMKTError(
                    f"the local {name} exited (code {process.returncode}): {tail[0][-300:]}. Fix: see {self.logs / (name + '.log')}."
                )

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to each process we started and every process they spawned (the ServerApp and
        ClientApp processes, the nodes' workers), then SIGKILL to those still there after
        `timeout_s`; returns once all are gone."""
        pids = [process.pid for _, process in self.processes]
        family = {pid: _started(pid) for pid in set(pids) | {c for pid in pids for c in _descendants(pid)}}
        for folder in self.output_dirs:
            stop_workers(folder, set(family), timeout_s)
        for _, process in reversed(self.processes):
            _signal(process.pid, signal.SIGTERM, group=True)
        for pid, started in family.items():
            if _started(pid) == started:  # still that process, not a new one that got its id
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process.pid, signal.SIGKILL, group=True)
                process.wait()

        def running() -> list[int]:
            return [pid for pid, started in family.items() if _alive(pid) and _started(pid) == started]

        while running() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in running():
            _signal(pid, signal.SIGKILL)
        self.processes.clear()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()
        if self.watchdog is not None:  # stopped in order: nothing left for it to end
            self.watchdog.kill()
            self.watchdog.wait()
            self.watchdog = None


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`."""
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _started(pid: int) -> Optional[float]:
    """When `pid` started, to tell it from a later process with the same id."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(pid: int, signum: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)  # a group: the process's own session
    except (ProcessLookupError, PermissionError):
        pass


def _wait_listening(federation: LocalFederation, port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        federation.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise FedMKTError(
        f"the local SuperLink did not listen on port {port} within {timeout_s:.0f} s. Fix: see {federation.logs / 'superlink.log'}."
    )


@dataclass(frozen=True)
class LocalLink:
    """How to reach a local SuperLink: its address and, with authentication, the CA that signed it."""

    address: str
    root_certificates: Optional[Path] = None
    control_token: Optional[Path] = None
    """The file holding the token its Control API requires (`control_auth`)."""


def _register_node(public_key: Path, link: LocalLink, home: Path, env: dict[str, str]) -> None:
    """`flwr supernode register` the key with the SuperLink (only registered SuperNodes may join)."""
    flower = FlowerConfig(
        superlink=link.address,
        insecure=link.root_certificates is None,
        root_certificates=str(link.root_certificates) if link.root_certificates else None,
    )
    write_flower_home(home, flower)
    if link.control_token is not None:
        write_cli_credentials(home, link.address, link.control_token)
    command = [flwr_executable(), "supernode", "register", str(public_key)]
    done = subprocess.run(command, env=dict(env, FLWR_HOME=str(home)), capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "registered successfully" not in done.stdout:
        raise FedMKTError(
            f"could not register SuperNode key {public_key.name} with the local SuperLink ({' '.join(done.stdout.split())[-200:]}). "
            "Fix: see the SuperLink's log in the run folder's nodes/superlink.log."
        )


@contextmanager
def local_federation(
    run_dir: Path, nodes: list[dict[str, Any]], gpus: Optional[str] = None, auth: bool = False
) -> Iterator[tuple[LocalLink, LocalFederation]]:
    """A SuperLink and one SuperNode per entry of `nodes` on 127.0.0.1; yields how to reach the
    SuperLink and the processes, and stops them all on exit.

    Without `auth` nothing is encrypted (nothing leaves this machine). With it the SuperLink runs
    TLS with a throw-away CA and admits only SuperNodes whose keys were registered
    (`--enable-supernode-auth`): each node gets its own key pair, registered before it starts.
    """
    server_gpu, client_gpus = gpu_assignment(gpus, len(nodes))
    link_port, *node_ports = free_ports(1 + len(nodes))
    federation = LocalFederation(
        run_dir / "nodes", sorted({Path(node["output-dir"]) for node in nodes if node.get("output-dir")})
    )
    commands = bind_flower_commands(run_dir / "nodes" / "bin")
    base_env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    base_env["PATH"] = os.pathsep.join([str(commands), str(Path(sys.executable).parent), base_env.get("PATH", "")])
    credentials = _private_folder(run_dir / "nodes" / "credentials")
    tls = write_local_tls(credentials) if auth else None
    token = write_token(credentials)
    link = LocalLink(f"127.0.0.1:{link_port}", tls.ca_certificate if tls else None, token)
    link_runtime = ["--root-certificates", str(tls.ca_certificate)] if tls else ["--insecure"]
    link_secret = write_superexec_secret(credentials, "superlink")
    security = ["--insecure"]
    if tls is not None:
        security = ["--ssl-ca-certfile", str(tls.ca_certificate), "--ssl-certfile", str(tls.server_certificate)]
        security += ["--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
    try:
        link_env = dict(base_env, FLWR_HOME=str(run_dir / "nodes" / "superlink"), **{TOKEN_ENV: str(token)})
        if server_gpu is not None:
            link_env["CUDA_VISIBLE_DEVICES"] = server_gpu
        federation.start(
            "superlink",
            [
                str(commands / "flower-superlink"),
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
                *_isolated(link_secret),
            ],
            link_env,
        )
        _wait_listening(federation, link_port)
        _start_superexec(federation, commands, link_secret, "superlink", link_port, link_runtime, link_env)
        for settings, port, gpu in zip(nodes, node_ports, client_gpus):
            name = f"client_{settings['partition-id']}"
            folder = run_dir / "nodes" / name
            folder.mkdir(parents=True, exist_ok=True)
            settings_file = folder / NODE_FILE
            settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
            node_secret = write_superexec_secret(credentials, name)
            env = dict(base_env, FLWR_HOME=str(folder / "flwr"))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            node_security = ["--insecure"]
            if tls is not None:
                private, public = write_node_key(credentials, name)
                _register_node(public, link, credentials / "register-home", base_env)
                node_security = ["--root-certificates", str(tls.ca_certificate), "--auth-supernode-private-key"]
                node_security.append(str(private))
            federation.start(
                name,
                [
                    str(commands / "flower-supernode"),
                    *node_security,
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={settings['partition-id']} settings={_toml_string(str(settings_file))}",
                    *_isolated(node_secret),
                ],
                env,
            )
            clientapps = federation.private_folder("fedmkt-clientapp-") / "socket"
            federation.start(f"{name}_clientapps", [sys.executable, "-m", CLIENTAPP_SERVER, str(clientapps)], env)
            _start_superexec(
                federation,
                commands,
                node_secret,
                name,
                port,
                ["--insecure"],
                dict(env, **{SERVER_ENV: str(clientapps)}),
            )
        federation.watch()
        yield link, federation
    finally:
        federation.stop()


CLIENTAPP_SERVER = "fedmkt.federation.flower.clientapp_server"


def _isolated(secret: Path) -> list[str]:
    """Flags that make a SuperLink or SuperNode leave its apps to a SuperExec we start, which must
    prove it holds `secret` before it may take a task.

    In Flower's default subprocess mode the Runtime API hands a pending ServerApp or ClientApp task,
    and the token that acts for it, to any caller that reaches its port; with the secret only our
    SuperExec gets it."""
    return ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def _start_superexec(
    federation: LocalFederation,
    commands: Path,
    secret: Path,
    name: str,
    runtime_port: int,
    security: list[str],
    env: dict[str, str],
) -> None:
    """The SuperExec that runs `name`'s apps (with `name`'s environment), signing with `secret`."""
    federation.start(
        f"{name}_superexec",
        [
            str(commands / "flower-superexec"),
            "--runtime-api-address",
            f"127.0.0.1:{runtime_port}",
            *security,
            "--superexec-auth-secret-file",
            str(secret),
        ],
        superexec_env(env),
    )


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def launch_local(
    config: RunConfig,
    resolved: str,
    gpus: Optional[str] = None,
    overwrite: bool = False,
    resume: bool = False,
    auth: bool = False,
) -> dict:
    """Run `config` on a Flower federation started on this machine; returns the summary in run_dir.

    Every source is read and checked here first (all parties' data is on this machine), so a bad
    config fails before any process starts. With `resume`, the run in run_dir continues after its
    last round checkpoint; a client whose private data the config does not name (the shared
    `run_dir/config.yaml`) gets the node settings it had, from `run_dir/nodes/client_N/node.yaml`.
    """
    run_dir = Path(config.run_dir).expanduser().resolve()
    shared, nodes = split_config(resolved, run_dir)
    if resume:
        check_resumable(read_checkpoint(run_dir), config, run_dir)
        for index, settings in enumerate(nodes):
            saved = run_dir / "nodes" / f"client_{index}" / NODE_FILE
            if not any(key in settings for key in _PRIVATE_KEYS) and saved.is_file():
                nodes[index] = yaml.safe_load(saved.read_text())
                config.clients[index] = apply_to_config(node_settings(nodes[index]), config).clients[index]
    validate(config)
    federation_data(config, list(config.parties()))
    validate_against_vocabularies(config)
    gpu_assignment(gpus, len(config.clients))  # a bad --gpus fails before anything starts
    lock = claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
    try:
        with local_federation(run_dir, nodes, gpus, auth) as (link, _):
            data = yaml.safe_load(shared)
            data["run_dir"] = str(run_dir)
            data.setdefault("federation", {})["backend"] = "flower"
            certificates = str(link.root_certificates) if link.root_certificates else None
            data["flower"] = dict(
                data.get("flower") or {},
                superlink=link.address,
                insecure=certificates is None,
                root_certificates=certificates,
            )
            text = yaml.safe_dump(data, sort_keys=False)
            return submit(
                run_config_from_text(text),
                resolved_config=text,
                resume=resume,
                claim=False,
                control_token=link.control_token,
            )
    except RunInterrupted as interrupt:  # the line printed says how to continue this run
        interrupt.run_dir, interrupt.command = str(run_dir), "launch-local"
        raise
    finally:
        lock.release()
