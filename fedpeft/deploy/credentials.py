"""TLS certificates, node credentials and the operator's app-signing key for a deployment.

Everything comes from ``cryptography``'s vetted primitives; nothing here invents a scheme:

- a certificate authority: RSA-3072 key, self-signed X.509 certificate (``CA:TRUE``,
  path length 0), which the nodes, the coordinator's front and the ``flwr`` CLI trust;
- the coordinator's certificate: RSA-3072 key, signed by the CA, ``serverAuth``, with every
  host name and IP address it is reached by in its subjectAltName (clients check it);
- the operator's app-signing key: Ed25519 in OpenSSH format (``operator.key``), the kind
  Flower 1.41's app verification takes; ``fedpeft server`` signs every app it submits with
  it, and every node trusts only it (``--trusted-entities``);
- per node, one folder ``nodes/<name>/`` to copy to that node, holding all it needs:

  - ``ca.crt``: the CA certificate;
  - ``node.key`` / ``node.key.pub``: its SuperNode authentication key pair, ECDSA on NIST
    P-384 in OpenSSH format (the coordinator registers the public key; the node signs each
    Fleet request with the private key);
  - ``tls.pem``: its TLS client key (ECDSA P-256) and certificate (``clientAuth``, CA-signed,
    common name = the node's name): the coordinator's front accepts only connections that
    present one (mutual TLS);
  - ``trusted-entities.yaml``: the operator's public app-signing key, for the SuperNode's
    ``--trusted-entities``.

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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import ConfigError

__all__ = [
    "Credentials",
    "NodeFiles",
    "add_nodes",
    "make_ca",
    "make_client_cert",
    "make_node_key",
    "make_operator_key",
    "make_server_cert",
    "write_credentials",
    "write_loopback_tls",
]

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


CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def _issue(
    subject: str,
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer: tuple[CaKey, x509.Name] | None,
    signer: CaKey,
    days: int,
    usage: x509.ExtendedKeyUsage | None = None,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    """A certificate for ``public``: a CA's own when ``issuer`` is ``None`` (self-signed by
    ``signer``), else a leaf ``issuer`` signs, with ``usage`` and ``hosts`` (subjectAltName)."""
    start, end = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer[1])
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.BasicConstraints(ca=issuer is None, path_length=0 if issuer is None else None),
            critical=True,
        )  # fmt: skip
    )
    if issuer is None:
        builder = builder.add_extension(_CA_USAGE, critical=True).add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(usage, critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_ca(
    common_name: str = "fedpeft CA", days: int = 365
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A new certificate authority: its private key and self-signed certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return key, _issue(common_name, key.public_key(), None, key, days)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


_SERVER_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def make_server_cert(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = 365,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """The coordinator's key and certificate for ``hosts`` (names and IP addresses), CA-signed."""
    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    issuer = (ca_key, ca_cert.subject)
    return key, _issue(hosts[0], key.public_key(), issuer, ca_key, days, _SERVER_AUTH, hosts)


def make_client_cert(
    ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, name: str, days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A node's TLS client key (ECDSA P-256) and certificate (``clientAuth``, CN = ``name``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = (ca_key, ca_cert.subject)
    return key, _issue(name, key.public_key(), issuer, ca_key, days, _CLIENT_AUTH)


def write_loopback_tls(folder: Path, days: int = 3650) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1 certificate it signs (ECDSA P-256), for TLS between two
    processes of one machine (a node's SuperNode and its tunnel): ``(ca.crt, cert, key)``.

    Made anew each time a node starts; the CA's key is never written.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("fedpeft loopback CA", ca_key.public_key(), None, ca_key, days)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = (ca_key, ca_cert.subject)
    loopback = ["127.0.0.1", "localhost"]
    cert = _issue("127.0.0.1", key.public_key(), issuer, ca_key, days, _SERVER_AUTH, loopback)
    paths = (folder / "ca.crt", folder / "server.pem", folder / "server.key")
    _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[1], cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[2], _pem_key(key), private=True)
    return paths


def _openssh(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """(private key, public key line) in OpenSSH format."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def make_operator_key() -> tuple[bytes, bytes]:
    """The operator's app-signing key pair (Ed25519): (private, public), OpenSSH format."""
    return _openssh(ed25519.Ed25519PrivateKey.generate())


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode key pair (ECDSA P-384): (private, public), OpenSSH format."""
    return _openssh(ec.generate_private_key(ec.SECP384R1()))


@dataclass(frozen=True)
class NodeFiles:
    """The files of one node's folder (``nodes/<name>/``, see the module docstring)."""

    folder: Path
    ca_cert: Path  # the CA certificate
    auth_key: Path  # SuperNode authentication private key (OpenSSH)
    auth_pub: Path  # its public key, registered at the coordinator
    tls: Path  # TLS client key and certificate, one PEM file
    trusted: Path  # --trusted-entities: the operator's public app-signing key

    @classmethod
    def at(cls, folder: Path) -> NodeFiles:
        """The files of the node folder ``folder``."""
        names = ("ca.crt", "node.key", "node.key.pub", "tls.pem", "trusted-entities.yaml")
        return cls(folder, *(folder / n for n in names))

    @property
    def name(self) -> str:
        """The node's name (its folder's)."""
        return self.folder.name

    def paths(self) -> list[Path]:
        """Every file of the folder."""
        return [self.ca_cert, self.auth_key, self.auth_pub, self.tls, self.trusted]

    def missing(self) -> list[str]:
        """Files the folder lacks."""
        return [str(p) for p in self.paths() if not p.is_file()]


@dataclass(frozen=True)
class Credentials:
    """Where :func:`write_credentials` put everything."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    operator_key: Path
    operator_pub: Path
    nodes: dict[str, NodeFiles]

    @classmethod
    def at(cls, root: str | Path, nodes: Sequence[str] = ()) -> Credentials:
        """The layout under ``root`` (``nodes``: these node folders)."""
        root = Path(root)
        return cls(
            ca_cert=root / "ca.crt",
            ca_key=root / "ca.key",
            server_cert=root / "server.pem",
            server_key=root / "server.key",
            operator_key=root / "operator.key",
            operator_pub=root / "operator.pub",
            nodes={n: NodeFiles.at(root / "nodes" / n) for n in nodes},
        )


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _pem_key(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_names(nodes: Sequence[str]) -> None:
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".")]
    if bad or len(set(nodes)) != len(nodes):
        raise ConfigError(f"node names must be distinct, non-empty file names, got {list(nodes)}")


def _write_node(
    files: NodeFiles, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, operator_pub: bytes,
    days: int,
) -> None:  # fmt: skip
    from fedpeft.deploy.signing import trusted_entities

    private, public = make_node_key()
    tls_key, tls_cert = make_client_cert(ca_key, ca_cert, files.name, days)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.auth_key, private, private=True)
    _write(files.auth_pub, public, private=False)
    pem = _pem_key(tls_key) + tls_cert.public_bytes(serialization.Encoding.PEM)
    _write(files.tls, pem, private=True)
    _write(files.trusted, trusted_entities(operator_pub).encode(), private=False)


def write_credentials(
    out: str | Path,
    hosts: Sequence[str],
    nodes: Sequence[str],
    days: int = 365,
    force: bool = False,
) -> Credentials:
    """Create a CA, the coordinator certificate for ``hosts``, the operator's app-signing key
    and one folder per node in ``out`` (see the module docstring). Private keys get mode 0600.

    Raises
    ------
    ConfigError
        If a file exists already (pass ``force`` to replace them), a node name is unusable,
        or no host is given.
    """
    _check_names(nodes)
    creds = Credentials.at(out, nodes)
    paths = [creds.ca_cert, creds.ca_key, creds.server_cert, creds.server_key,
             creds.operator_key, creds.operator_pub]  # fmt: skip
    paths += [p for files in creds.nodes.values() for p in files.paths()]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{len(existing)} credential file(s) exist already (e.g. {existing[0]}); "
            "pass --force to replace them"
        )
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    operator_private, operator_public = make_operator_key()
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.ca_key, _pem_key(ca_key), private=True)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.server_key, _pem_key(server_key), private=True)
    _write(creds.operator_key, operator_private, private=True)
    _write(creds.operator_pub, operator_public, private=False)
    for files in creds.nodes.values():
        _write_node(files, ca_key, ca_cert, operator_public, days)
    return creds


def add_nodes(out: str | Path, nodes: Sequence[str], days: int = 365) -> Credentials:
    """Add node folders to the credentials in ``out`` (signed by its CA, trusting its
    operator key); an existing node folder is never replaced.

    Raises
    ------
    ConfigError
        If ``out`` lacks the CA or operator key, or a node folder exists already.
    """
    _check_names(nodes)
    creds = Credentials.at(out, nodes)
    missing = [str(p) for p in (creds.ca_cert, creds.ca_key, creds.operator_pub) if not p.is_file()]
    if missing:
        raise ConfigError(f"missing {missing}: create the credentials with `fedpeft keys` first")
    taken = [f.name for f in creds.nodes.values() if f.folder.exists()]
    if taken:
        raise ConfigError(f"node folders {taken} exist already in {Path(out) / 'nodes'}")
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, rsa.RSAPrivateKey):
        raise ConfigError(f"{creds.ca_key} is not the RSA CA key `fedpeft keys` writes")
    for files in creds.nodes.values():
        _write_node(files, ca_key, ca_cert, creds.operator_pub.read_bytes(), days)
    return creds
