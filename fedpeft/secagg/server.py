"""The coordinator's side of secure aggregation: route keys and shares, unmask the sum.

The coordinator never sees a client's vector: it sees its masked vector ``y_u``, and at
unmask either the self-mask seed of a survivor or the masking key of a dropout, each from
``t`` shares. Survivors of the masked-input stage (``U3``) are summed; their self masks
are removed; the pairwise masks they added for neighbours that dropped after sharing secrets
(``U2 \\ U3``) are removed with the dropouts' reconstructed keys. A client that drops at any
stage is simply left out; the round fails (``RoundError``-style ``ProtocolError``) only if a
needed secret has fewer than ``t`` shares or fewer than ``min_clients`` survive.

Replies are checked before use: the right session and stage, from a client asked in that
stage, at most once each, and of the right shape; anything else is ignored and counted.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpeft.errors import ProtocolError
from fedpeft.secagg import shamir
from fedpeft.secagg.client import KEY, SELF, mask_seed_info
from fedpeft.secagg.crypto import expand_mask, pair_key, private_from_bytes
from fedpeft.secagg.params import Encoding, default_degree, default_threshold, harary_graph

__all__ = ["SecAggServer", "SecAggSum"]


@dataclass
class SecAggSum:
    """The result: the float sum of the survivors' vectors and who they are."""

    total: np.ndarray
    survivors: list[int]
    dropped: dict[str, list[int]] = field(default_factory=dict)
    ignored: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class SecAggServer:
    """One session's coordinator state.

    Parameters
    ----------
    n : int
        Participants (indices ``0..n-1``).
    dim : int
        Vector length.
    clip : float
        Values are clipped to ``[-clip, clip]`` and encoded in fixed point.
    neighbours : int
        Graph degree ``k`` (0: :func:`~fedpeft.secagg.params.default_degree`).
    threshold : int
        Shares needed per secret (0: a majority of ``k``).
    round_id : int
        Bound into the session id.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        clip: float,
        neighbours: int = 0,
        threshold: int = 0,
        round_id: int = 0,
        min_survivors: int = 1,
    ) -> None:
        self.n, self.dim, self.clip = n, dim, clip
        self.k = neighbours or default_degree(n)
        self.t = threshold or default_threshold(self.k)
        if not 1 <= self.t <= self.k:
            raise ProtocolError(f"secagg threshold {self.t} must be in 1..{self.k}", "structure")
        nonce = os.urandom(32)
        self.session = hashlib.sha256(nonce + struct.pack(">QQ", round_id, n)).digest()
        self.graph = harary_graph(n, self.k, self.session)
        self.encoding = Encoding(clip, n)
        self.min_survivors = min_survivors
        self.ignored = 0
        self.c_pk: dict[int, bytes] = {}
        self.s_pk: dict[int, bytes] = {}
        self.cts: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> ciphertext
        self.u2: list[int] = []
        self.masked: dict[int, np.ndarray] = {}
        self.masked_with: dict[int, list[int]] = {}

    def _ok(self, reply: Any, asked: set[int], seen: set[int], cid: int) -> bool:
        if cid not in asked or cid in seen or not isinstance(reply, Mapping):
            self.ignored += 1
            return False
        seen.add(cid)
        return True

    # ------------------------------------------------------------------ stage requests
    def keys_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 1 for every participant."""
        return {
            i: {
                "stage": "keys",
                "session": self.session,
                "me": i,
                "n": self.n,
                "neighbours": self.graph[i],
                "threshold": self.t,
                "dim": self.dim,
                "clip": float(self.clip),
            }  # fmt: skip
            for i in range(self.n)
        }

    def share_requests(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Collect public keys (``U1``); stage 2 for each ``U1`` client with ``t`` neighbours."""
        seen: set[int] = set()
        for cid, r in sorted(replies.items()):
            if not self._ok(r, set(range(self.n)), seen, cid):
                continue
            c, s = r.get("c_pk"), r.get("s_pk")
            if isinstance(c, bytes) and isinstance(s, bytes) and len(c) == len(s) == 32:
                self.c_pk[cid], self.s_pk[cid] = c, s
        out = {}
        for u in sorted(self.c_pk):
            peers = [v for v in self.graph[u] if v in self.c_pk]
            if len(peers) >= self.t:
                out[u] = {
                    "stage": "share", "session": self.session, "ids": peers,
                    "c_pk": [self.c_pk[v] for v in peers], "s_pk": [self.s_pk[v] for v in peers],
                }  # fmt: skip
        return out

    def mask_requests(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Collect encrypted shares (``U2``); stage 3 routes each client the shares it holds."""
        seen: set[int] = set()
        for cid, r in sorted(replies.items()):
            if not self._ok(r, set(self.c_pk), seen, cid):
                continue
            dst, ct = r.get("dst"), r.get("ct")
            if not (isinstance(dst, list) and isinstance(ct, list) and len(dst) == len(ct)):
                self.ignored += 1
                continue
            if set(dst) != {v for v in self.graph[cid] if v in self.c_pk}:
                self.ignored += 1  # shares must go to exactly its neighbours in U1
                continue
            for v, blob in zip(dst, ct, strict=True):
                self.cts.setdefault(v, {})[cid] = blob
        self.u2 = sorted({u for per in self.cts.values() for u in per})
        out = {}
        for v in self.u2:
            src = sorted(u for u in self.cts.get(v, {}) if u in self.u2)
            if len(src) >= self.t:
                out[v] = {
                    "stage": "mask", "session": self.session, "src": src,
                    "ct": [self.cts[v][u] for u in src],
                }  # fmt: skip
                self.masked_with[v] = src
        return out

    def unmask_requests(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Collect masked vectors (``U3``); stage 4 asks each survivor for its shares."""
        seen: set[int] = set()
        bad: set[int] = set()
        for cid, r in sorted(replies.items()):
            if not self._ok(r, set(self.masked_with), seen, cid):
                continue
            y = r.get("y")
            if not isinstance(y, bytes) or len(y) != 8 * self.dim:
                self.ignored += 1
                continue
            self.masked[cid] = np.frombuffer(y, dtype="<u8").astype(np.uint64)
            accused = {int(u) for u in r.get("bad", []) if isinstance(u, int)}
            # cid did not mask with senders whose shares failed authentication
            self.masked_with[cid] = [u for u in self.masked_with[cid] if u not in accused]
            bad |= accused
        for u in bad:  # a client whose shares failed authentication counts as dropped
            self.masked.pop(u, None)
        self.u3 = sorted(self.masked)
        self.dropped = sorted(set(self.u2) - set(self.u3))
        out = {}
        for v in self.u3:
            mine = set(self.masked_with[v])
            out[v] = {
                "stage": "unmask", "session": self.session,
                "alive": sorted((mine & set(self.u3)) | {v}),
                "dropped": sorted(mine & set(self.dropped)),
            }  # fmt: skip
        return out

    def finish(self, replies: Mapping[int, Any]) -> SecAggSum:
        """Reconstruct the secrets from the shares and return the unmasked sum."""
        seen: set[int] = set()
        shares: dict[tuple[int, int], list[bytes]] = {}
        for cid, r in sorted(replies.items()):
            if not self._ok(r, set(self.u3), seen, cid):
                continue
            ids, kinds, vals = r.get("ids"), r.get("kinds"), r.get("shares")
            if not (isinstance(ids, list) and isinstance(kinds, list) and isinstance(vals, list)):
                self.ignored += 1
                continue
            for u, kind, s in zip(ids, kinds, vals, strict=False):
                want = SELF if u in self.u3 else KEY
                if kind == want and isinstance(s, bytes):
                    shares.setdefault((u, kind), []).append(s)
        if len(self.u3) < self.min_survivors:
            raise ProtocolError(
                f"{len(self.u3)} clients survived secure aggregation, need {self.min_survivors}",
                "timeout",
            )
        total = np.zeros(self.dim, np.uint64)
        for u in self.u3:
            total += self.masked[u]
            total -= expand_mask(self._secret(shares, u, SELF), self.dim)
        for u in self.dropped:
            keys = private_from_bytes(self._secret(shares, u, KEY))
            for v in self.u3:
                if u not in self.masked_with.get(v, []):
                    continue
                seed = pair_key(keys, self.s_pk[v], mask_seed_info(self.session, u, v))
                m = expand_mask(seed, self.dim)
                if v < u:  # v added +m for u
                    total -= m
                else:
                    total += m
        return SecAggSum(
            total=self.encoding.decode_sum(total, len(self.u3)),
            survivors=list(self.u3),
            ignored=self.ignored,
        )

    def _secret(self, shares: Mapping[tuple[int, int], list[bytes]], u: int, kind: int) -> bytes:
        got = shares.get((u, kind), [])
        if len(got) < self.t:
            what = "self-mask seed" if kind == SELF else "masking key"
            raise ProtocolError(
                f"secure aggregation cannot recover the {what} of client {u}: {len(got)} shares, "
                f"threshold {self.t}; the round must be run again",
                "timeout",
            )
        return shamir.combine(got, self.t)
