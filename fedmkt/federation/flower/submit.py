"""`fedmkt fit --backend flower`: submit the packaged Flower App to a SuperLink and wait for it.

`flwr run` builds the app folder shipped with fedmkt (`app/`) into a FAB and starts a run on the
SuperLink, with the path of the resolved config as the run config `config-path`. The ServerApp
then runs the federation and writes `summary.json` into `run_dir`; this process streams its log
and, once the run has finished, reports its outcome. The SuperLink connection (address, TLS)
comes from the `flower` config group, written into a private Flower config home, so the user's
`~/.flwr` is neither read nor changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from fedmkt.config import FlowerConfig, RunConfig, validate
from fedmkt.errors import FedMKTError, RunInterrupted
from fedmkt.federation.checkpoint import check_resumable, read_checkpoint
from fedmkt.federation.checkpoint_record import finished_line
from fedmkt.federation.distributed import party_processes
from fedmkt.federation.flower.app_trust import app_dir
from fedmkt.federation.flower.control_auth import TOKEN_ENV, write_cli_credentials
from fedmkt.federation.run_folder import claim_run_dir
from fedmkt.files import atomic_write_text

CONNECTION = "fedmkt"
"""Name of the SuperLink connection in the private Flower config."""

_STATUS_POLL_S = 3.0


def flwr_executable() -> str:
    """Path of the `flwr` command, or a one-line error saying how to get it."""
    executable = shutil.which(
        "flwr", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if importlib.util.find_spec("flwr") is None or executable is None:
        raise FedMKTError(
            "federation.backend flower needs Flower, which is not installed. Fix: `pip install 'flwr>=1.42'` on every machine."
        )
    return executable


def write_flower_home(home: Path, flower: FlowerConfig) -> None:
    """A Flower config home whose default connection is the SuperLink `flower` names."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {json.dumps(flower.superlink)}",
    ]
    if flower.insecure:
        lines.append("insecure = true")
    elif flower.root_certificates:
        certificates = Path(flower.root_certificates).expanduser().resolve()
        if not certificates.is_file():
            raise FedMKTError(
                f"flower.root_certificates {certificates} does not exist. Fix: point it at the CA certificate (PEM) that signed the SuperLink's certificate."
            )
        lines.append(f"root-certificates = {json.dumps(str(certificates))}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def check_supported(config: RunConfig) -> None:
    """Refuse what the flower backend does not do (yet): parties spread over several processes, and
    private client data named in the shared run config (on Flower it is each node's own)."""
    private = [
        f"clients[{i}].{key}" for i, c in enumerate(config.clients) for key in ("data", "eval") if getattr(c, key)
    ]
    if private:
        raise FedMKTError(
            f"{', '.join(private)} set in the run config, but on the flower backend a client's private data is its own node's. "
            "Fix: remove them from the run config and give each client's SuperNode its own (--node-config data=PATH eval=PATH, "
            "see docs/flower.md), or run the config with `fedmkt launch-local`, which does this for you."
        )
    parties = {"server": config.server} | {f"clients[{i}]": c for i, c in enumerate(config.clients)}
    spread = [name for name, party in parties.items() if party_processes(party.trainer) > 1]
    if spread:
        raise FedMKTError(
            f"the flower backend does not support parties spread over several processes yet (strategy ddp/fsdp with devices > 1: "
            f"{', '.join(spread)}). Fix: give every party trainer.devices: 1 with --backend flower, or use the inprocess backend."
        )


def submit(
    config: RunConfig,
    resolved_config: str,
    stream: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    claim: bool = True,
    control_token: Optional[Path] = None,
) -> dict:
    """Run FedMKT on the Flower SuperLink in `config.flower`; returns the summary from run_dir.

    With `resume`, the run continues in run_dir after its last round checkpoint (checked here first).
    As `fit` does, it holds run_dir's lock while the run goes on (a second submission to the same
    folder is refused) and refuses a folder that holds a run unless `resume` or `overwrite`;
    `claim=False` is for a caller that holds the lock already (`launch-local`). `control_token`
    (else the file `FEDMKT_CONTROL_TOKEN_FILE` names) is the token the SuperLink's Control API
    requires, when it was started with one (`control_auth`).
    """
    if resume and overwrite:
        raise FedMKTError("--resume and --overwrite contradict each other. Fix: give one of them.")
    validate(config)
    check_supported(config)
    run_dir = Path(config.run_dir).expanduser().resolve()
    if resume:
        state = read_checkpoint(run_dir)
        check_resumable(state, config, run_dir)
        if int(state["round"]) >= config.federation.rounds:
            print(finished_line(run_dir, config.federation.rounds))
            return state["summary"]
    flwr = flwr_executable()
    if not _listening(config.flower.superlink):  # before the folder is touched: nothing is lost
        raise FedMKTError(
            f"cannot reach the Flower SuperLink at {config.flower.superlink} (nothing accepts connections there). Fix: start it "
            "(`flower-superlink --host 0.0.0.0 --port PORT --ssl-ca-certfile ... --ssl-certfile ... --ssl-keyfile ...`, see docs/flower.md) "
            "or set flower.superlink to its host:port."
        )
    lock = claim_run_dir(run_dir, resume, overwrite) if claim else None
    try:
        token = control_token or (Path(os.environ[TOKEN_ENV]) if os.environ.get(TOKEN_ENV) else None)
        run_id, status, details = _run_on_superlink(flwr, config, run_dir, resolved_config, stream, resume, token)
    finally:
        if lock is not None:
            lock.release()
    if status != "finished:completed":
        reason = " ".join(details.replace("ServerApp failed with exception:", "").split()) or "no details"
        raise FedMKTError(
            f"Flower run {run_id} ended as {status}: {reason}"
            + ("" if "Fix:" in reason else f". Fix: see `flwr log {run_id}` on the SuperLink and the SuperNodes' logs.")
        )
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise FedMKTError(
            f"Flower run {run_id} finished but {summary_file} is missing: the ServerApp wrote its outputs on the SuperLink's machine. "
            "Fix: run `fedmkt fit` on the SuperLink's machine, or give run_dir a path on a file system both share."
        )
    print(f"\nsummary: {summary_file}")
    return json.loads(summary_file.read_text())


def _run_on_superlink(
    flwr: str,
    config: RunConfig,
    run_dir: Path,
    resolved_config: str,
    stream: bool,
    resume: bool,
    control_token: Optional[Path] = None,
) -> tuple[Optional[int], str, str]:
    """Write the run's config into its (claimed) folder, start the run and wait for it: (run id, status, details)."""
    config_path = run_dir / "config.yaml"
    atomic_write_text(config_path, resolved_config)
    (run_dir / "summary.json").unlink(missing_ok=True)  # so a stale one is never mistaken for this run's
    with tempfile.TemporaryDirectory(prefix="fedmkt-flwr-home-") as home:
        write_flower_home(Path(home), config.flower)
        if control_token is not None:
            write_cli_credentials(Path(home), config.flower.superlink, control_token)
        env = dict(os.environ, FLWR_HOME=home)
        command = [
            flwr,
            "run",
            str(app_dir()),
            CONNECTION,
            "--run-config",
            f"config-path={json.dumps(str(config_path))} resume={'true' if resume else 'false'}",
        ]
        if stream:
            command.append("--stream")
        started: dict[str, int] = {}
        try:
            run_id, output = _start(command, env, echo=stream, started=started)
            if run_id is None:
                raise FedMKTError(_start_failure(config, output))
            status, details = _wait_until_finished(flwr, run_id, env)
        except RunInterrupted:  # Ctrl-C here stops the run on the SuperLink too, not only this command
            if "run_id" in started:
                _stop_run(flwr, started["run_id"], env)
            raise
    return run_id, status, details


def _start(command: list[str], env: dict, echo: bool, started: dict[str, int]) -> tuple[Optional[int], str]:
    """Run `flwr run`, echoing its output (the streamed ServerApp log); returns (run id, output).

    The run id is also put into `started` as soon as it is known, for a caller that is interrupted.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    run_id = None
    assert process.stdout is not None
    try:
        for line in process.stdout:
            match = re.search(r"Successfully started run (\d+)", line)
            if match and run_id is None:
                run_id = started["run_id"] = int(match.group(1))
            if echo and run_id is not None:  # the run's log; Flower's own complaints become one FedMKTError line
                print(line, end="", flush=True)
            else:
                lines.append(line)
        process.wait()
    finally:
        if process.poll() is None:  # interrupted: the log stream must not outlive this command
            process.terminate()
            process.wait()
    return run_id, "".join(lines)


def _stop_run(flwr: str, run_id: int, env: dict) -> None:
    """Ask the SuperLink to stop run `run_id` (its ServerApp and ClientApps); best effort, 30 s at most."""
    try:
        subprocess.run([flwr, "stop", str(run_id), CONNECTION], env=env, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass  # the SuperLink is gone too; nothing is left to stop


def _start_failure(config: RunConfig, output: str) -> str:
    """One line saying why `flwr run` could not start the run, and what to do."""
    text = " ".join(_strip_ansi(output).split())
    text = re.sub(r"^Using SuperLink: \S+ \([^)]*\) ", "", text)
    address = config.flower.superlink
    if re.search(
        r"unavailable|ssl|tls|certificate|handshake", text, re.IGNORECASE
    ):  # the port answers (checked), the API does not
        return (
            f"the Flower SuperLink at {address} accepts connections but `flwr run` cannot talk to it ({text[-300:]}). Fix: match its TLS "
            "settings: flower.root_certificates = the CA certificate that signed its --ssl-certfile, or flower.insecure true only if it "
            "runs with --insecure (tests)."
        )
    return f"`flwr run` could not start the run on the SuperLink at {address} ({text[-300:] or 'no output'}). Fix: check the SuperLink's log."


def _listening(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something accepts TCP connections at `host:port` (IPv6 as `[::1]:port`)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _wait_until_finished(flwr: str, run_id: int, env: dict) -> tuple[str, str]:
    """Poll `flwr ls --run-id` until the run has finished; returns (status, status details)."""
    while True:
        result = subprocess.run(
            [flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        try:
            runs = json.loads(result.stdout).get("runs", [])
        except json.JSONDecodeError:
            runs = []
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return str(runs[0]["status"]), str(runs[0].get("status-details", ""))
        if result.returncode != 0 and not runs:
            text = " ".join(_strip_ansi(result.stdout + result.stderr).split())
            raise FedMKTError(
                f"lost the Flower SuperLink while waiting for run {run_id} ({text[-300:]}). Fix: check that the SuperLink is still running."
            )
        time.sleep(_STATUS_POLL_S)


def _strip_ansi(text: str) -> str:
    """Flower's CLI output without colour codes and the box it draws around errors."""
    return re.sub(r"[╭╮╰╯│─]+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text)).replace(" Error ", " ")
