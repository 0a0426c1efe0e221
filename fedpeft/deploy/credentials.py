"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Everything comes from ``cryptography``'s vetted primitives; nothing here invents a scheme:

- a certificate authority: RSA-3072 key, self-signed X.509 certificate (``CA:TRUE``,
  path length 0), which SuperNodes and the ``flwr`` CLI trust (``--root-certificates``);
- the SuperLink's certificate: RSA-3072 key, signed by the CA, ``serverAuth``, with every
  host name and IP address it is reached by in its subjectAltName (gRPC checks it);
- one key pair per SuperNode: ECDSA on NIST P-384 in OpenSSH format, the kind Flower 1.41's
  node authentication takes (the operator registers the public key with
  ``flwr supernode register``; the node signs each request with the private key, passed as
  ``--auth-supernode-private-key``).

Private keys are written with mode 0600 and never overwrite an existing file unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import ConfigError

__all__ = ["Credentials", "make_ca", "make_node_key", "make_server_cert", "write_credentials"]

RSA_BITS = 3072


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ConfigError(f"certificate validity must be >= 1 day, got {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(
    common_name: str = "fedpeft CA", days: int = 365
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A new certificate authority: its private key and self-signed certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = 365,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """The SuperLink's key and certificate for ``hosts`` (names and IP addresses), CA-signed."""
    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode key pair: (private key, public key), both in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


@dataclass(frozen=True)
class Credentials:
    """Where :func:`write_credentials` put everything."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # node name -> (private, public)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_credentials(
    out: str | Path,
    hosts: Sequence[str],
    nodes: Sequence[str],
    days: int = 365,
    force: bool = False,
) -> Credentials:
    """Create a CA, the SuperLink certificate for ``hosts`` and a key pair per node in ``out``.

    Files: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``, ``nodes/<name>`` and
    ``nodes/<name>.pub``. Private keys get mode 0600.

    Raises
    ------
    ConfigError
        If a file exists already (pass ``force`` to replace them), a node name is unusable,
        or no host is given.
    """
    root = Path(out)
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".")]
    if bad or len(set(nodes)) != len(nodes):
        raise ConfigError(f"node names must be distinct, non-empty file names, got {list(nodes)}")
    creds = Credentials(
        ca_cert=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        node_keys={n: (root / "nodes" / n, root / "nodes" / f"{n}.pub") for n in nodes},
    )
    paths = [creds.ca_cert, creds.ca_key, creds.server_cert, creds.server_key]
    paths += [p for pair in creds.node_keys.values() for p in pair]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{len(existing)} credential file(s) exist already (e.g. {existing[0]}); "
            "pass --force to replace them"
        )
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.ca_key, _pem_key(ca_key), private=True)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.server_key, _pem_key(server_key), private=True)
    for private_path, public_path in creds.node_keys.values():
        private, public = make_node_key()
        _write(private_path, private, private=True)
        _write(public_path, public, private=False)
    return creds
