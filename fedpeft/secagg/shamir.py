"""Shamir secret sharing over the prime field ``GF(2^521 - 1)`` (Shamir, CACM 1979).

Secrets are 32-byte strings (mask seeds and X25519 private keys), read as integers below
``2^256`` and shared with a random polynomial of degree ``t - 1`` whose coefficients come
from :mod:`secrets`; share ``i`` is the polynomial at ``x = i`` (``i >= 1``). Any ``t``
shares give the secret back by Lagrange interpolation at 0; fewer reveal nothing about it.
The prime ``2^521 - 1`` (a Mersenne prime) is larger than every secret, so no secret is
reduced.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fedpeft.errors import ProtocolError

__all__ = ["PRIME", "SHARE_BYTES", "combine", "split"]

PRIME = 2**521 - 1
SHARE_BYTES = 4 + 66  # x (u32) + y (66 bytes, big-endian)
SECRET_BYTES = 32


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` (32 bytes) for the points ``xs`` (distinct, >= 1), any ``t`` suffice."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError(f"need distinct points >= 1 and 1 <= threshold <= {len(xs)}")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = x.to_bytes(4, "big") + y.to_bytes(66, "big")
    return out


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Raises
    ------
    ProtocolError
        If there are too few shares, or they are malformed or repeat a point.
    """
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares, need {threshold} to recover the secret")
    points = []
    for s in shares[:threshold]:
        if len(s) != SHARE_BYTES:
            raise ProtocolError(f"a share is {len(s)} bytes, expected {SHARE_BYTES}")
        points.append((int.from_bytes(s[:4], "big"), int.from_bytes(s[4:], "big")))
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or min(xs) < 1 or any(y >= PRIME for _, y in points):
        raise ProtocolError("shares repeat a point or lie outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ProtocolError("the shares do not belong to one secret")
    return secret.to_bytes(SECRET_BYTES, "big")
