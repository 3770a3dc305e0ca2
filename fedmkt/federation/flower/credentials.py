"""Keys and certificates for an authenticated Flower federation: TLS for the SuperLink, a key pair per
SuperNode, a SuperExec secret per SuperLink and SuperNode.

Flower authenticates SuperNodes only over TLS: the SuperLink (started with
`--enable-supernode-auth`) admits a SuperNode whose public key was registered with
`flwr supernode register`, and the SuperNode signs its requests with the private key. For
`fedmkt launch-local --auth` everything runs on one machine, so fedmkt makes a throw-away CA
and a certificate for 127.0.0.1 itself; on real machines the operators bring their own
(docs/flower.md). A SuperLink or SuperNode in Flower's process isolation hands its tasks only to a
SuperExec that signs its requests with their shared secret. Private keys and secrets are written with
mode 0600 in a folder of mode 0700.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["LocalTLS", "write_local_tls", "write_node_key", "write_superexec_secret"]


@dataclass(frozen=True)
class LocalTLS:
    """The files of a one-machine TLS setup."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path


def _private_folder(folder: Path) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def _write_private(path: Path, data: bytes) -> None:
    """A new file readable by its owner alone: an existing file (or a symbolic link planted in its
    place) is removed first, never written through, and never keeps its own mode."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def write_local_tls(folder: Path, days: int = 30) -> LocalTLS:
    """A CA, and a certificate it signed for 127.0.0.1 / localhost, in `folder`."""
    folder = _private_folder(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmkt launch-local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = LocalTLS(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return files


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of one SuperNode, as Flower reads them (ECDSA P-384, OpenSSH format)."""
    folder = _private_folder(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def write_superexec_secret(folder: Path, name: str) -> Path:
    """A fresh random secret that `name` (a SuperLink or SuperNode) and its SuperExec share, in
    `folder/superexec_<name>.secret` (0600): Flower reads the file's exact bytes."""
    path = _private_folder(folder) / f"superexec_{name}.secret"
    _write_private(path, secrets.token_bytes(32))
    return path
