"""One client's side of secure aggregation: a state machine over four stages.

Stages, each a request from the coordinator and a reply (Bonawitz et al., CCS 2017, with the
neighbour graph of SecAgg+, Bell et al., CCS 2020):

1. ``keys``: the session (random 32-byte id, round, this client's index, its neighbours,
   threshold ``t``, vector length, clip range). Reply: two fresh X25519 public keys.
2. ``share``: the neighbours' public keys (those who answered stage 1). The client draws a
   self-mask seed ``b``, Shamir-shares ``b`` and its masking private key among those
   neighbours (``t`` of them recover either) and replies with each pair of shares encrypted
   to its holder (AES-GCM, key from X25519 + HKDF, associated data = session, sender,
   recipient).
3. ``mask``: the encrypted shares addressed to this client (from neighbours who answered
   stage 2). Reply: ``y = encode(x) + PRG(b) + sum_v +-PRG(s_uv)`` in ``Z_2^64`` over the
   neighbours ``v`` that answered stage 2 (``+`` if this client's index is lower), and the
   senders whose shares failed authentication (the coordinator drops them).
4. ``unmask``: which neighbours are alive and which dropped. The client reveals the
   self-mask share of each alive one and the key share of each dropped one, never both for
   one peer: it aborts (and answers nothing more in the session) if the lists overlap,
   repeat an id, name an unknown id, name itself as dropped or not alive, leave fewer than
   ``t`` of its neighbours alive, or ask for the other kind of share of a peer it already
   answered for.

Every request carries the session id and its stage; one for another session or out of order
is refused (``ProtocolError`` with code ``replay``) without changing the state.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.errors import ProtocolError
from fedpeft.secagg import shamir
from fedpeft.secagg.crypto import (
    KeyPair,
    decrypt,
    encrypt,
    expand_mask,
    pair_key,
    private_from_bytes,
)
from fedpeft.secagg.params import Encoding

__all__ = ["STAGES", "SecAggAbort", "SecAggClient", "mask_seed_info", "share_aad"]

STAGES = ("keys", "share", "mask", "unmask")
SELF, KEY = 0, 1  # kinds of share revealed at unmask


class SecAggAbort(ProtocolError):
    """The client refuses to go on with this session (the coordinator misbehaved)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "client_error")


def share_aad(session: bytes, src: int, dst: int) -> bytes:
    """Associated data of the shares ``src`` encrypts to ``dst``."""
    return b"fedpeft-secagg-share" + session + struct.pack(">II", src, dst)


def mask_seed_info(session: bytes, u: int, v: int) -> bytes:
    """HKDF ``info`` of the pairwise mask seed of ``u`` and ``v`` (order-free)."""
    lo, hi = min(u, v), max(u, v)
    return b"fedpeft-secagg-mask" + session + struct.pack(">II", lo, hi)


def enc_info(session: bytes, u: int, v: int) -> bytes:
    """HKDF ``info`` of the share-encryption key of ``u`` and ``v`` (order-free)."""
    lo, hi = min(u, v), max(u, v)
    return b"fedpeft-secagg-enc" + session + struct.pack(">II", lo, hi)


def _int(req: Mapping[str, Any], key: str) -> int:
    value = req.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"secagg request field {key!r} must be an int", "decode")
    return value


def _ints(req: Mapping[str, Any], key: str) -> list[int]:
    value = req.get(key)
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise ProtocolError(f"secagg request field {key!r} must be a list of int", "decode")
    return [int(i) for i in value]


def _bytes_list(req: Mapping[str, Any], key: str, size: int | None = None) -> list[bytes]:
    value = req.get(key)
    if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
        raise ProtocolError(f"secagg request field {key!r} must be a list of bytes", "decode")
    if size is not None and any(len(b) != size for b in value):
        raise ProtocolError(f"secagg request field {key!r} must hold {size}-byte items", "decode")
    return list(value)


class SecAggClient:
    """The client's state for one session (see the module docstring).

    Parameters
    ----------
    vector : np.ndarray
        What this client contributes to the sum (float; clipped to the session's range).
    """

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = np.asarray(vector, np.float64).reshape(-1)
        self.stage = -1
        self.session = b""
        self.aborted = ""
        self.revealed: dict[int, int] = {}

    def handle(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one coordinator request; raises ``ProtocolError`` / :class:`SecAggAbort`."""
        if self.aborted:
            raise SecAggAbort(f"this client aborted the session: {self.aborted}")
        stage = req.get("stage")
        if stage not in STAGES:
            raise ProtocolError(f"unknown secagg stage {stage!r}", "decode")
        index = STAGES.index(str(stage))
        session = req.get("session")
        if index == 0 and self.stage == -1:
            if not isinstance(session, bytes) or len(session) != 32:
                raise ProtocolError("secagg session id must be 32 bytes", "decode")
            return self._keys(req, session)
        if session != self.session:
            raise ProtocolError("secagg request for another session (replayed?)", "replay")
        repeat_unmask = index == 3 and self.stage == 3
        if index != self.stage + 1 and not repeat_unmask:
            raise ProtocolError(
                f"secagg stage {stage!r} out of order (last answered: "
                f"{STAGES[self.stage] if self.stage >= 0 else 'none'})",
                "replay",
            )
        handler = (self._share, self._mask, self._unmask)[index - 1]
        out = handler(req)
        self.stage = index
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Everything this client knows of its session, as plain values (ints, floats,
        bytes, lists of them: a Flower ``ConfigRecord``), without the vector.

        A node keeps it in its ``Context.state`` between the stages' messages, which may be
        handled by different processes (Ray actors, a deployed node's worker).
        """
        out: dict[str, Any] = {
            "stage": self.stage, "session": self.session, "aborted": self.aborted,
            "revealed_ids": list(self.revealed), "revealed_kinds": list(self.revealed.values()),
        }  # fmt: skip
        if self.stage >= 0:
            out.update(
                me=self.me, neighbours=sorted(self.neighbours), t=self.t,
                clip=float(self.encoding.clip), n=self.encoding.n,
                enc_sk=self.enc_keys.private, mask_sk=self.mask_keys.private,
            )  # fmt: skip
        if self.stage >= 1:
            ids = sorted(self.c_pk)
            out.update(
                pk_ids=ids, c_pk=[self.c_pk[i] for i in ids], s_pk=[self.s_pk[i] for i in ids],
                self_seed=self.self_seed,
            )  # fmt: skip
        if self.stage >= 2:
            held = sorted(self.held)
            out.update(
                held_ids=held, held_b=[self.held[u][0] for u in held],
                held_k=[self.held[u][1] for u in held], masked_with=list(self.masked_with),
            )  # fmt: skip
        return out

    @classmethod
    def restore(cls, state: Mapping[str, Any], vector: np.ndarray) -> SecAggClient:
        """The client :meth:`state` describes, contributing ``vector``."""
        c = cls(vector)
        c.stage, c.session, c.aborted = int(state["stage"]), state["session"], state["aborted"]
        c.revealed = dict(zip(state["revealed_ids"], state["revealed_kinds"], strict=True))
        if c.stage >= 0:
            c.me, c.neighbours, c.t = state["me"], set(state["neighbours"]), state["t"]
            c.encoding = Encoding(state["clip"], state["n"])
            c.enc_keys = private_from_bytes(state["enc_sk"])
            c.mask_keys = private_from_bytes(state["mask_sk"])
        if c.stage >= 1:
            c.c_pk = dict(zip(state["pk_ids"], state["c_pk"], strict=True))
            c.s_pk = dict(zip(state["pk_ids"], state["s_pk"], strict=True))
            c.self_seed = state["self_seed"]
        if c.stage >= 2:
            pairs = zip(state["held_b"], state["held_k"], strict=True)
            c.held = dict(zip(state["held_ids"], pairs, strict=True))
            c.masked_with = list(state["masked_with"])
        return c

    # ------------------------------------------------------------------ stages
    def _keys(self, req: Mapping[str, Any], session: bytes) -> dict[str, Any]:
        me, t, dim, n = (_int(req, k) for k in ("me", "threshold", "dim", "n"))
        neighbours, clip = _ints(req, "neighbours"), req.get("clip")
        if not isinstance(clip, float):
            raise ProtocolError("secagg keys request lacks a float clip", "decode")
        if dim != self.vector.size:
            raise ProtocolError(f"secagg vector has {self.vector.size} values, session {dim}")
        if (
            not 1 <= t <= len(neighbours)
            or me in neighbours
            or len(set(neighbours)) != len(neighbours)
        ):
            raise SecAggAbort(f"threshold {t} and neighbours {neighbours[:5]}... are inconsistent")
        self.session, self.me, self.neighbours, self.t = session, me, set(neighbours), t
        self.encoding = Encoding(clip, n)
        self.enc_keys, self.mask_keys = KeyPair(), KeyPair()
        self.stage = 0
        return {"c_pk": self.enc_keys.public, "s_pk": self.mask_keys.public}

    def _share(self, req: Mapping[str, Any]) -> dict[str, Any]:
        ids = _ints(req, "ids")
        c_pks, s_pks = _bytes_list(req, "c_pk", 32), _bytes_list(req, "s_pk", 32)
        if (
            len(set(ids)) != len(ids)
            or not set(ids) <= self.neighbours
            or len(c_pks) != len(ids)
            or len(s_pks) != len(ids)
        ):
            raise SecAggAbort("the share request names peers that are not my neighbours")
        if len(ids) < self.t:
            raise SecAggAbort(f"only {len(ids)} neighbours advertised keys, threshold {self.t}")
        self.c_pk = dict(zip(ids, c_pks, strict=True))
        self.s_pk = dict(zip(ids, s_pks, strict=True))
        self.self_seed = os.urandom(32)
        holders = sorted(ids)
        xs = [h + 1 for h in holders]
        b_shares = shamir.split(self.self_seed, xs, self.t)
        k_shares = shamir.split(self.mask_keys.private, xs, self.t)
        cts = []
        for h in holders:
            key = pair_key(self.enc_keys, self.c_pk[h], enc_info(self.session, self.me, h))
            plain = struct.pack(">II", self.me, h) + b_shares[h + 1] + k_shares[h + 1]
            cts.append(encrypt(key, plain, share_aad(self.session, self.me, h)))
        return {"dst": holders, "ct": cts}

    def _mask(self, req: Mapping[str, Any]) -> dict[str, Any]:
        src, cts = _ints(req, "src"), _bytes_list(req, "ct")
        if len(src) != len(cts) or len(set(src)) != len(src) or not set(src) <= set(self.c_pk):
            raise SecAggAbort("the mask request names peers that did not advertise keys")
        if len(src) < self.t:
            raise SecAggAbort(f"only {len(src)} neighbours shared secrets, threshold {self.t}")
        self.held: dict[int, tuple[bytes, bytes]] = {}
        bad = []
        for u, ct in zip(src, cts, strict=True):
            key = pair_key(self.enc_keys, self.c_pk[u], enc_info(self.session, self.me, u))
            try:
                plain = decrypt(key, ct, share_aad(self.session, u, self.me))
            except ProtocolError:
                bad.append(u)
                continue
            size = shamir.SHARE_BYTES
            if len(plain) != 8 + 2 * size or struct.unpack(">II", plain[:8]) != (u, self.me):
                bad.append(u)
                continue
            self.held[u] = (plain[8 : 8 + size], plain[8 + size :])
        self.masked_with = sorted(self.held)
        y = self.encoding.encode(self.vector)  # (dim,) uint64
        y += expand_mask(self.self_seed, y.size)
        for v in self.masked_with:
            seed = pair_key(self.mask_keys, self.s_pk[v], mask_seed_info(self.session, self.me, v))
            m = expand_mask(seed, y.size)
            if self.me < v:
                y += m
            else:
                y -= m
        return {"y": y.astype("<u8").tobytes(), "bad": bad}

    def _unmask(self, req: Mapping[str, Any]) -> dict[str, Any]:
        alive, dropped = _ints(req, "alive"), _ints(req, "dropped")
        problem = self._unmask_problem(alive, dropped)
        if problem:
            self.aborted = problem
            raise SecAggAbort(problem)
        ids, kinds, shares = [], [], []
        for u, kind in [(u, SELF) for u in alive if u != self.me] + [(u, KEY) for u in dropped]:
            self.revealed[u] = kind
            b_share, k_share = self.held[u]
            ids.append(u)
            kinds.append(kind)
            shares.append(b_share if kind == SELF else k_share)
        return {"ids": ids, "kinds": kinds, "shares": shares}

    def _unmask_problem(self, alive: list[int], dropped: list[int]) -> str:
        if len(set(alive)) != len(alive) or len(set(dropped)) != len(dropped):
            return "the unmask request lists a client twice"
        if set(alive) & set(dropped):
            return "the unmask request lists a client as both alive and dropped"
        if self.me in dropped or self.me not in alive:
            return "the unmask request lists this client as dropped"
        peers = (set(alive) | set(dropped)) - {self.me}
        if not peers <= set(self.held):
            return "the unmask request names clients whose shares this client does not hold"
        alive_neighbours = len(set(alive) & self.neighbours)
        if alive_neighbours < self.t:
            return f"only {alive_neighbours} neighbours alive, threshold {self.t}: too many died"
        for u in peers:
            want = SELF if u in alive else KEY
            if self.revealed.get(u, want) != want:
                return f"asked for both kinds of secret of client {u}"
        return ""
