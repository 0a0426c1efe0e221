"""Deployment credentials: the CA signs the SuperLink certificate for the right hosts, a real
TLS handshake on 127.0.0.1 verifies with them, SuperNode keys sign and verify as Flower's node
authentication does (ECDSA P-384, SHA-256), private keys are 0600, nothing is overwritten."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.cli import main
from fedpeft.deploy.credentials import write_credentials
from fedpeft.errors import ConfigError


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return write_credentials(
        tmp_path_factory.mktemp("creds"), ["127.0.0.1", "localhost", "coord.example"], ["a", "b"]
    )


def test_ca_signs_a_server_certificate_for_every_host(creds):
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.example"]


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(5))
    except (ssl.SSLError, OSError):
        pass  # the client hung up after rejecting the certificate
    finally:
        conn.close()


def _echo_over_tls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """A one-shot TLS echo server on 127.0.0.1 and a client that sends ``hello``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=_serve_once, args=(listener, server_ctx))
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"hello")
                return tls.recv(5)
        finally:
            thread.join(timeout=10)


def test_tls_handshake_on_localhost_verifies_with_the_ca(creds):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    trusting = ssl.create_default_context(cafile=str(creds.ca_cert))
    assert _echo_over_tls(server_ctx, trusting) == b"hello"
    with pytest.raises(ssl.SSLCertVerificationError):  # without our CA: refused
        _echo_over_tls(server_ctx, ssl.create_default_context())


def test_node_keys_sign_and_verify_like_flower_node_auth(creds):
    private_path, public_path = creds.nodes["a"].auth_key, creds.nodes["a"].auth_pub
    private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    message = b"2026-11-24T01:00:00+00:00"  # Flower signs a timestamp
    signature = private.sign(message, ec.ECDSA(hashes.SHA256()))
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]
    other = serialization.load_ssh_public_key(creds.nodes["b"].auth_pub.read_bytes())
    with pytest.raises(InvalidSignature):
        other.verify(signature, message, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]


def test_private_keys_are_owner_only_and_nothing_is_overwritten(creds, tmp_path):
    node = creds.nodes["a"]
    for path in (creds.ca_key, creds.server_key, creds.operator_key, node.auth_key, node.tls):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.ca_cert.stat().st_mode) == 0o644
    before = creds.ca_key.read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        write_credentials(creds.ca_cert.parent, ["127.0.0.1"], ["a"])
    assert creds.ca_key.read_bytes() == before
    with pytest.raises(ConfigError, match="node names"):
        write_credentials(tmp_path / "x", ["127.0.0.1"], ["a", "a"])
    with pytest.raises(ConfigError, match="at least one host"):
        write_credentials(tmp_path / "y", [], ["a"])


def test_keys_command_writes_one_folder_per_node_and_adds_nodes_later(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path / "k"), "--nodes", "3"]) == 0
    nodes = tmp_path / "k" / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["node0", "node1", "node2"]
    assert sorted(p.name for p in (nodes / "node0").iterdir()) == [
        "ca.crt", "node.key", "node.key.pub", "tls.pem", "trusted-entities.yaml",
    ]  # fmt: skip
    assert "copy this folder to the node" in capsys.readouterr().out
    assert main(["keys", "--out", str(tmp_path / "k")]) == 2  # exists: refused, exit code 2
    before = (nodes / "node0" / "node.key").read_bytes()
    assert main(["keys", "--out", str(tmp_path / "k"), "--add", "late"]) == 0
    assert (nodes / "late" / "tls.pem").is_file()
    assert (nodes / "node0" / "node.key").read_bytes() == before  # nothing else touched
    late = x509.load_pem_x509_certificate((nodes / "late" / "tls.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "k" / "ca.crt").read_bytes())
    late.verify_directly_issued_by(ca)  # the same CA signs a node added later
    assert main(["keys", "--out", str(tmp_path / "k"), "--add", "late"]) == 2  # no overwrite
    assert main(["keys", "--out", str(tmp_path / "none"), "--add", "x"]) == 2  # no CA there


def test_node_tls_certificate_is_a_client_certificate_of_the_ca(creds):
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(creds.nodes["a"].tls.read_bytes())
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    # a real mutual-TLS handshake: the server requires a client certificate from the CA
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=str(creds.ca_cert))
    node = ssl.create_default_context(cafile=str(creds.ca_cert))
    node.load_cert_chain(creds.nodes["a"].tls)
    assert _echo_over_tls(server_ctx, node) == b"hello"
    with pytest.raises((ssl.SSLError, OSError)):  # only the CA's certificate: refused
        _echo_over_tls(server_ctx, ssl.create_default_context(cafile=str(creds.ca_cert)))
