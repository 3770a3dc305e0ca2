"""Which Flower apps a SuperNode runs: the fedmkt app its own installation builds, and those its
policy lists (`trusted-apps`), nothing else.

Whoever may start a run (the Control API's operator) chooses the app, and a ClientApp's code runs
on the node, next to its private data, with the node's rights; the node policy would mean little
if the server could ship code that ignores it. Flower's own `--trusted-entities` accepts only apps
whose signatures Flower Hub vouches for, and a locally built FAB carries none. Flower builds a FAB
byte for byte the same from the same files (fixed zip dates), so a node knows the hash of the app
its fedmkt ships without asking anyone: a server with the same fedmkt version sends exactly that.

`install()` runs in the `flwr-clientapp` process before Flower pulls the task (launch-local's
commands, and `python -m fedmkt.federation.flower.app_trust commands DIR` for a deployment): it
checks the FAB's sha256 after it is pulled and before it is installed or imported, so a foreign app
gets an error reply naming its hash, and none of its code runs. Like `control_auth`, it rests on
internals of flwr 1.42 (`flwr.supernode.runtime.run_clientapp.pull_task_input`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedmkt.errors import FedMKTError

__all__ = ["app_dir", "check_app", "install", "own_app_sha256"]


def app_dir() -> Path:
    """The Flower App project folder installed with fedmkt (what `fedmkt fit --backend flower` submits)."""
    return Path(__file__).resolve().parent / "app"


@lru_cache(maxsize=1)
def own_app_sha256() -> str:
    """sha256 of the FAB that Flower builds from the app installed with this fedmkt."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir())).hexdigest()


def check_app(content: bytes, node_config: Mapping[str, Any]) -> None:
    """Refuse, in one line, a FAB that is neither this node's own fedmkt app nor one its policy trusts."""
    from fedmkt.federation.flower.node import node_settings

    digest = hashlib.sha256(content).hexdigest()
    if digest == own_app_sha256() or digest in node_settings(dict(node_config)).policy.trusted_apps:
        return
    raise FedMKTError(
        f"this node runs only the fedmkt app its own installation builds (sha256 {own_app_sha256()}) and the apps "
        f"its trusted-apps lists; the run's app has sha256 {digest}. Fix: run the server with the node's fedmkt "
        "version, or add that sha256 to the node's trusted-apps."
    )


def install() -> None:
    """In a `flwr-clientapp` process, before it starts: check each task's app with `check_app`."""
    import importlib

    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    pull = getattr(module, "pull_task_input", None)
    if pull is None:
        raise SystemExit(
            f"fedmkt: this Flower ({module.__name__}) has no pull_task_input, so the node cannot check which app it "
            "runs. Fix: pip install 'flwr>=1.42,<1.43'."
        )
    if getattr(pull, "checks_app", False):
        return

    def pull_checked(*args: Any, **kwargs: Any):
        message, context, run, fab = pull(*args, **kwargs)
        check_app(fab.content, context.node_config)
        return message, context, run, fab

    pull_checked.checks_app = True  # type: ignore[attr-defined]
    module.pull_task_input = pull_checked


COMMANDS_MARKER = ".fedmkt-commands"
"""The file that says a folder's Flower commands are ones `commands DIR` wrote (and may replace)."""


def main(argv: list[str]) -> int:
    """`commands DIR`: write Flower's commands into DIR with the node's checks in place; put DIR first on
    the PATH of the SuperNode's `flower-superexec`, which starts each ClientApp by name."""
    if len(argv) != 2 or argv[0] != "commands":
        print("usage: python -m fedmkt.federation.flower.app_trust commands DIR", file=sys.stderr)
        return 2
    from fedmkt.federation.flower.local import FLOWER_COMMANDS, bind_flower_commands

    folder = Path(argv[1]).expanduser()
    marker = folder / COMMANDS_MARKER
    taken = [name for name in FLOWER_COMMANDS if (folder / name).exists()]
    if taken and not marker.is_file():
        print(
            f"fedmkt: {folder} already holds {', '.join(taken)}, which fedmkt did not write there. "
            "Fix: name a new or empty folder (or one an earlier `app_trust commands` wrote).",
            file=sys.stderr,
        )
        return 2
    bind_flower_commands(folder)
    marker.write_text(
        "Flower's commands with fedmkt's checks, written by `python -m fedmkt.federation.flower.app_trust commands`\n"
    )
    print(
        f"Flower's commands, with fedmkt's checks, are in {folder}; run the SuperNode's SuperExec with PATH={folder}:$PATH"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
