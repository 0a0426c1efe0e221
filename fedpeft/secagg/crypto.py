"""The primitives of secure aggregation, all from ``cryptography``: nothing invented here.

- key agreement: X25519 (RFC 7748); two key pairs per client and session, one to encrypt
  shares, one to derive pairwise mask seeds;
- key derivation: HKDF-SHA256 (RFC 5869) with ``info`` binding the session, the purpose and
  the ordered pair of clients, so a key never serves two sessions or two purposes;
- share encryption: AES-256-GCM with a random 96-bit nonce and associated data naming the
  session, sender and recipient (a share replayed from another session or re-addressed to
  another client fails authentication);
- mask expansion: the ChaCha20 keystream (RFC 8439) under a 256-bit seed, read as
  little-endian ``uint64`` words (uniform over ``Z_2^64``).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.errors import ProtocolError

__all__ = [
    "KeyPair",
    "decrypt",
    "encrypt",
    "expand_mask",
    "pair_key",
    "private_from_bytes",
]

RAW = serialization.Encoding.Raw


class KeyPair:
    """An X25519 key pair; ``public`` and ``private`` are the 32-byte raw encodings."""

    def __init__(self, key: X25519PrivateKey | None = None) -> None:
        self.key = key or X25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)
        self.private = self.key.private_bytes(
            RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


def private_from_bytes(raw: bytes) -> KeyPair:
    """The key pair of a 32-byte private key (a reconstructed secret)."""
    return KeyPair(X25519PrivateKey.from_private_bytes(raw))


def pair_key(mine: KeyPair, theirs: bytes, info: bytes) -> bytes:
    """32 bytes from X25519 between ``mine`` and the peer's public key, through HKDF-SHA256."""
    try:
        shared = mine.key.exchange(X25519PublicKey.from_public_bytes(theirs))
    except ValueError as err:
        raise ProtocolError(f"bad X25519 public key: {err}", "structure") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12) || ciphertext || tag (16)``."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises ``ProtocolError`` if authentication fails."""
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolError("a share failed authentication", "decode") from None


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform ``uint64`` words: the ChaCha20 keystream of ``seed`` (32 bytes)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(b"\0" * (8 * length)), dtype="<u8").astype(np.uint64)
