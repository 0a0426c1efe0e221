"""Secure aggregation parameters: the neighbour graph, the threshold and fixed-point encoding.

Graph (SecAgg+, Bell et al., CCS 2020): the participants are shuffled by a generator seeded
with the session and put on a ring; each is a neighbour of the ``k / 2`` nearest on either
side (a Harary graph; ``k = n - 1`` is the complete graph of the original SecAgg, Bonawitz et
al., CCS 2017). A client shares its secrets with, and masks against, its neighbours only, so
its cost grows with ``k``, not ``n``. A secret is recovered from any ``t`` of its holder's
``k`` neighbours; at most ``k - t`` of a client's neighbours may drop before the round must
be abandoned, and a server colluding with fewer than ``t`` of them learns nothing of it.

Fixed point: a value ``x`` is clipped to ``[-c, c]`` and encoded as
``round(x * H / c) + H`` in ``Z_2^64`` with ``H = 2^(b-1) - 1`` (so in ``[0, 2^b - 2]``); the
sum of ``n`` encodings decodes as ``(sum - n H) * c / H``, exactly 0 when every value was 0.
No sum may wrap: ``n (2^b - 1) < 2^63``, so ``b = min(52, 62 - ceil(log2 n))`` bits (52: more
would be below float64 precision). The rounding error per value is at most ``c / (2 H)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpeft.errors import ConfigError
from fedpeft.seeding import np_rng

__all__ = ["Encoding", "default_degree", "default_threshold", "harary_graph"]


def default_degree(n: int) -> int:
    """Neighbours per client: all (``n - 1``) up to 16 clients, else ``2 ceil(log2 n) + 2``."""
    if n <= 17:
        return n - 1
    return 2 * math.ceil(math.log2(n)) + 2  # below n - 1 for every n >= 18


def default_threshold(k: int) -> int:
    """A strict majority of the neighbours: ``floor(k / 2) + 1``."""
    return k // 2 + 1


def harary_graph(n: int, k: int, seed: bytes) -> list[list[int]]:
    """Neighbours of each of ``n`` participants: a ``k``-regular ring over a seeded shuffle."""
    if not 1 <= k <= n - 1:
        raise ConfigError(f"secure aggregation needs 1 <= neighbours <= n - 1 = {n - 1}, got {k}")
    if k == n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    order = np_rng(seed.hex(), "secagg-graph").permutation(n)
    pos = {int(p): i for i, p in enumerate(order)}
    half = (k + 1) // 2  # odd k: one more on each side (degree k + 1)
    out = []
    for i in range(n):
        p = pos[i]
        out.append(sorted({int(order[(p + d) % n]) for d in range(-half, half + 1) if d}))
    return out


@dataclass(frozen=True)
class Encoding:
    """Fixed-point encoding of values in ``[-clip, clip]`` for ``n`` summands (module doc)."""

    clip: float
    n: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"secure aggregation clip range must be > 0, got {self.clip}")
        if self.n < 1 or self.n >= 2**20:
            raise ConfigError(f"secure aggregation supports 1..2^20 clients, got {self.n}")

    @property
    def bits(self) -> int:
        """Bits per encoded value."""
        return min(52, 62 - math.ceil(math.log2(max(self.n, 2))))

    @property
    def half(self) -> int:
        """``H``: the code of 0."""
        return int(2 ** (self.bits - 1) - 1)

    @property
    def scale(self) -> float:
        """Encoded units per value unit."""
        return self.half / self.clip

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``x`` (float) clipped and encoded as ``uint64``."""
        v = np.clip(np.asarray(x, np.float64), -self.clip, self.clip)
        return (np.rint(v * self.scale).astype(np.int64) + self.half).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` encoded values whose ``uint64`` sum is ``total``."""
        centred = total.astype(np.int64) - np.int64(count * self.half)  # exact integers
        return centred.astype(np.float64) / self.scale
