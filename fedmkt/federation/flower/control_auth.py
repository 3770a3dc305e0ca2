"""A token on the SuperLink's Control API, so only the operator registers SuperNodes and starts runs.

The Control API (`flwr run`, `flwr supernode register`, `flwr ls`, `flwr stop`) of the installed
Flower accepts anyone who reaches its port: its account authentication needs Flower's enterprise
OIDC plugin, and its address cannot be a Unix socket. The request path that checks accounts is
open source, though: every Control API request goes through the SuperLink's authentication
plugin with the `Authorization: Bearer` token the `flwr` CLI sends. So the `flower-superlink`
that fedmkt starts loads `TokenControlAuthn`, which admits a request only with the token in the
file `FEDMKT_CONTROL_TOKEN_FILE` names (mode 0600, in the operator's 0700 credentials folder), and
the operator's `flwr` homes get that token in their credential store, where the CLI reads it.
Anyone else, without the file, is answered 401 ("Authentication failed").

This binds to internals of flwr 1.42 (`flower_superlink.load_control_authn_plugin`, the CLI's
credential-store keys); `install` refuses to start a SuperLink it cannot protect.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

from fedmkt.errors import FedMKTError
from fedmkt.federation.flower.credentials import _write_private

TOKEN_ENV = "FEDMKT_CONTROL_TOKEN_FILE"
"""The environment variable naming the token file, for the SuperLink and for `fedmkt fit --backend flower`."""


def write_token(folder: Path) -> Path:
    """A fresh random token in `folder/control.token` (0600); the folder must be the operator's alone."""
    path = Path(folder) / "control.token"
    _write_private(path, secrets.token_urlsafe(32).encode())
    return path


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise FedMKTError(
            f"cannot read the Control API token file {path} ({error.strerror or error}). "
            f"Fix: point {TOKEN_ENV} at the token the SuperLink was started with."
        ) from None
    if not token:
        raise FedMKTError(
            f"the Control API token file {path} is empty. Fix: point {TOKEN_ENV} at the SuperLink's token."
        )
    return token


def write_cli_credentials(home: Path, address: str, token_file: Path) -> None:
    """Put the token into the credential store of the `flwr` home `home`, for the connection `address`
    (the CLI then sends it as a bearer token with every Control API request)."""
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
    from flwr.common.constant import AuthnType

    token = read_token(token_file).encode()
    entries = {
        AUTHN_TYPE_STORE_KEY % address: str(AuthnType.OIDC).encode(),
        ACCESS_TOKEN_STORE_KEY % address: token,
        REFRESH_TOKEN_STORE_KEY % address: token,  # the CLI wants one; the SuperLink never refreshes it
    }
    text = yaml.safe_dump({key: base64.b64encode(value).decode() for key, value in entries.items()})
    Path(home).mkdir(parents=True, exist_ok=True)
    _write_private(Path(home) / "credentials.yaml", text.encode())


def _plugin_class():
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.superlink.auth_plugin.auth_plugin import ControlAuthnPlugin

    class TokenControlAuthn(ControlAuthnPlugin):
        """Admits a Control API request only with the operator's token (compared in constant time)."""

        def __init__(self, token: str) -> None:
            self._token = token.encode()

        def _account(self, metadata: Sequence[tuple[str, str | bytes]]) -> Optional[AccountInfo]:
            for _, value in metadata:
                given = value if isinstance(value, bytes) else str(value).encode()
                if hmac.compare_digest(given, self._token):
                    return AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)  # runs keep one owner
            return None

        def get_login_details(self):
            return None  # `flwr login` has nothing to do: the token is given, not obtained

        def validate_tokens_in_metadata(self, metadata):
            account = self._account(metadata)
            return account is not None, account

        def get_auth_tokens(self, device_code: str):
            return None

        def refresh_tokens(self, metadata):
            account = self._account(metadata)
            return (metadata, account) if account is not None else (None, None)

    return TokenControlAuthn


def install() -> None:
    """In the `flower-superlink` process, before it starts: load `TokenControlAuthn` with the token in
    `FEDMKT_CONTROL_TOKEN_FILE` instead of Flower's plugin (nothing changes without the variable)."""
    path = os.environ.get(TOKEN_ENV)
    if not path:
        return
    import importlib

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    if not hasattr(module, "load_control_authn_plugin"):
        raise SystemExit(
            f"fedmkt: this Flower ({module.__name__}) has no load_control_authn_plugin, so the Control API cannot be "
            f"protected with a token. Fix: pip install 'flwr>=1.42,<1.43', or unset {TOKEN_ENV}."
        )
    plugin = _plugin_class()(read_token(Path(path)))
    module.load_control_authn_plugin = lambda: plugin


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m fedmkt.federation.flower.control_auth superlink ARGS...`: `flower-superlink ARGS` with its
    Control API behind the token in `FEDMKT_CONTROL_TOKEN_FILE`; `... token FILE`: write a fresh token;
    `... credentials ADDRESS [FLWR_HOME]`: give a `flwr` home (default ~/.flwr) that token for ADDRESS."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m fedmkt.federation.flower.control_auth {superlink ARGS... | token FILE | credentials ADDRESS [FLWR_HOME]}"
    if not argv or argv[0] not in ("superlink", "token", "credentials"):
        print(usage, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "token" and len(rest) == 1:
        path = Path(rest[0]).expanduser()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(path, secrets.token_urlsafe(32).encode())
        print(f"wrote a Control API token to {path} (mode 0600)")
        return 0
    if not os.environ.get(TOKEN_ENV):
        print(
            f"fedmkt: {TOKEN_ENV} is not set. Fix: point it at the token file (`... token FILE` writes one).",
            file=sys.stderr,
        )
        return 2
    if command == "credentials" and 1 <= len(rest) <= 2:
        home = Path(rest[1]).expanduser() if len(rest) == 2 else Path.home() / ".flwr"
        write_cli_credentials(home, rest[0], Path(os.environ[TOKEN_ENV]))
        print(f"the flwr home {home} now sends the token to {rest[0]}")
        return 0
    if command == "superlink":
        install()
        from flwr.superlink.cli import flower_superlink

        sys.argv = ["flower-superlink", *rest]
        return flower_superlink() or 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
