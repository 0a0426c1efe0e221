"""Signed apps: nodes run only the Flower app the operator submitted.

Flower 1.41's SuperNode refuses an app (a FAB) unless one of its ``--trusted-entities`` keys
verifies the app's signature: Ed25519 over the 8-byte big-endian signing time followed by the
SHA-256 of the FAB (``flwr.supercore.primitives.asymmetric_ed25519``), carried in the FAB's
``verifications``. Flower 1.41 fills those only for apps fetched from Flower Hub; an app
submitted from a folder reaches the nodes unsigned, and a node with ``--trusted-entities``
refuses every such app.

fedpeft closes the gap without changing what the node checks:

1. ``fedpeft server`` builds the FAB exactly as ``flwr run`` will (Flower's own builder),
   signs its hash with the operator key (``operator.key`` from ``fedpeft keys``) and stores
   the signature in ``KEYS/apps/<sha256>.json`` (:class:`AppSignatures`);
2. the coordinator's front (:mod:`fedpeft.deploy.link`) puts the stored signature into the
   FAB's ``verifications`` when a node fetches it (:func:`attach_signature`); an app nobody
   signed passes unchanged, i.e. unsigned;
3. every node runs its SuperNode with ``--trusted-entities`` naming only the operator's public
   key, so Flower on the node verifies the signature and refuses anything else.

Whoever can submit runs without the operator key (a foreign app, a changed app) gets an app
every node refuses. The front holds no private key: it only forwards what ``fedpeft server``
signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedpeft._flwr import GetFabResponse, fab_signing_message
from fedpeft.errors import ConfigError, ProtocolError

__all__ = ["AppSignatures", "attach_signature", "key_id", "sign_app", "trusted_entities"]


def _public(public_openssh: bytes) -> ed25519.Ed25519PublicKey:
    key = serialization.load_ssh_public_key(public_openssh)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError("the operator's app-signing key must be Ed25519 (`fedpeft keys`)")
    return key


def key_id(public_openssh: bytes) -> str:
    """The name the operator key goes by in ``--trusted-entities`` and in signatures."""
    raw = _public(public_openssh).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return "fedpeft-operator-" + hashlib.sha256(raw).hexdigest()[:16]


def trusted_entities(public_openssh: bytes) -> str:
    """The YAML file a SuperNode's ``--trusted-entities`` reads: one key id -> public key."""
    line = public_openssh.decode("ascii").strip()
    return f"{key_id(public_openssh)}: {json.dumps(line)}\n"


def load_operator_key(path: Path) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    """The operator's private key and its OpenSSH public key."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; `fedpeft keys` writes operator.key")
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key (the kind Flower verifies apps with)")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return key, public


def sign_app(
    fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None
) -> dict[str, Any]:
    """A signature record of ``fab``: its hash, the key id, the signature and its time."""
    when = int(time.time()) if signed_at is None else signed_at
    digest = hashlib.sha256(fab).digest()
    signature = key.sign(fab_signing_message(digest, when))
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return {
        "fab_hash": digest.hex(),
        "key_id": key_id(public),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": when,
    }


class AppSignatures:
    """Signature records, one JSON file per signed app: ``<folder>/<sha256 of the FAB>.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, fab: bytes, key: ed25519.Ed25519PrivateKey) -> Path:
        """Sign ``fab`` and store the record (written atomically)."""
        record = sign_app(fab, key)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{record['fab_hash']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
        return path

    def get(self, fab_hash: str) -> dict[str, Any] | None:
        """The record of the app with this hash, or ``None`` (never signed, or unreadable)."""
        if len(fab_hash) != 64 or any(c not in "0123456789abcdef" for c in fab_hash):
            return None
        try:
            record = json.loads((self.folder / f"{fab_hash}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("fab_hash") == fab_hash else None


def attach_signature(body: bytes, signatures: AppSignatures) -> bytes:
    """A ``GetFabResponse`` (protobuf bytes) with the stored signature of its FAB attached.

    The hash is computed from the FAB's content, not taken from the response. A FAB without
    a stored signature is returned as it came (unsigned: nodes refuse it).

    Raises
    ------
    ProtocolError
        If ``body`` is not a ``GetFabResponse``.
    """
    response = GetFabResponse()
    try:
        response.ParseFromString(body)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ProtocolError(f"get-fab response does not parse: {err}") from None
    digest = hashlib.sha256(response.fab.content).hexdigest()
    record = signatures.get(digest)
    if record is None:
        return body
    verification = {"signature": record["signature"], "signed_at": record["signed_at"]}
    response.fab.verifications[record["key_id"]] = json.dumps(verification)
    response.fab.verifications["valid_license"] = "Valid"
    return bytes(response.SerializeToString())
