"""Secure aggregation inside a round: replace the clients' replies by their secure sum.

With ``secagg.enabled`` every instruction is marked ``secure``: the clients train, keep their
contribution and reply with the header only (validated as usual). The coordinator then runs a
session (:mod:`fedpeft.secagg`) among the clients whose replies were valid and hands the
strategy what the sum allows:

The mean is weighted as the strategy weights in the clear (capability ``example_weighted``):
the session's first request gives client ``k`` its share ``p_k = n_k / sum(n)`` of the
round's valid updates (``n_k``: its ``num_examples`` after ``validation.max_weight_ratio``;
with equal weights ``1 / m``), the client contributes ``p_k x_k``, and the coordinator divides
the secure sum by the survivors' ``sum p_k``: ``sum_k p_k x_k / sum_k p_k`` is the clear
weighted mean over the survivors. The weights are no secret (the coordinator reads
``num_examples`` in every header); a client that scales by another weight only changes its
own contribution, as any client can. With DP every client weighs 1 and the divisor is the
expected clients per round (the DP sensitivity).

The update family (:mod:`fedpeft.families`) lays the updates out as one vector and rebuilds
what the strategy aggregates from the sum:

- LoRA (strategies declared linear; all clients were sent the same factors): ONE update, the
  sent factors plus the clients' mean change, with the round's total ``num_examples``. Only
  the trained coordinates are summed (FFA-LoRA: ``B``); the frozen ones keep exactly their
  sent value.
- Seed/scalar (fedkseed, ferret): every survivor's update, all with weight 1 and no pairs,
  plus the mean's scalars of every (block, seed) direction (times the number of survivors)
  carried on the first one, so the strategy's per-direction ``sum_k g_k / m`` is the clients'
  mean and each client's synced version is still recorded.

A client that drops during the session counts as a failure of the round (``timeout``); a
session that cannot finish (too few shares or survivors) is a ``RoundError``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid

from fedpeft.config import RunConfig
from fedpeft.errors import ProtocolError, RoundError
from fedpeft.families import family_of
from fedpeft.secagg.flower import grid_transport, reply_limit
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.session import Send, run_session
from fedpeft.server.exchange import Exchange, Instruction

__all__ = ["secure_aggregate"]


def secure_aggregate(
    grid: Grid,
    cfg: RunConfig,
    instructions: Mapping[str, Instruction],
    nodes: Mapping[str, int],
    got: Exchange,
    server_round: int,
    zo_blocks: int = 1,
    divisor: int | None = None,
    example_weighted: bool = True,
) -> None:
    """Run the session and replace ``got.updates`` (see the module docstring).

    ``divisor``: with DP, the expected clients per round (every client then weighs 1, and the
    sensitivity stays ``C / k`` when clients drop); ``None``: the survivors' weights.
    ``example_weighted``: weight clients by ``num_examples`` (else equally).
    """
    updates = sorted(got.updates, key=lambda u: u.header.client_id)
    if not updates:
        return
    cids = [u.header.client_id for u in updates]
    layout = family_of(instructions[cids[0]]).flat(instructions, cids, zo_blocks)
    dim = layout.dim
    sc, n = cfg.secagg, len(cids)
    if n < 2:
        raise RoundError(server_round, "secure aggregation needs at least 2 valid updates")
    k = min(sc.neighbours, n - 1) if sc.neighbours else 0
    t = min(sc.threshold, k or n - 1) if sc.threshold else 0
    # DP: every client weighs 1 (the sensitivity); else each client's share of the mean
    shares = [1.0] * len(updates) if divisor else _shares(updates, example_weighted)
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        server = SecAggServer(
            n, dim, sc.clip, neighbours=k, threshold=t, round_id=server_round,
            min_survivors=cfg.federation.min_clients,
        )  # fmt: skip
        send = grid_transport(
            grid, {i: nodes[c] for i, c in enumerate(cids)}, cfg.federation.round_timeout_s,
            counts, limit=reply_limit(dim, n),
        )  # fmt: skip
        result = run_session(server, _with_shares(send, shares))
    except ProtocolError as err:
        raise RoundError(server_round, f"secure aggregation failed: {err.reason}") from err
    survivors = {cids[i] for i in result.survivors}
    for c in cids:
        if c not in survivors:
            got.fail(c, "timeout", "dropped out of secure aggregation")
    got.counts["bytes_up"] += counts.get("bytes_up", 0)
    got.counts["bytes_down"] += counts.get("bytes_down", 0)
    got.metrics.update(
        {
            "secagg_s": time.perf_counter() - t0,
            "secagg_bytes_up": counts.get("bytes_up", 0),
            "secagg_bytes_down": counts.get("bytes_down", 0),
            "secagg_survivors": len(survivors),
            "secagg_neighbours": server.k,
            "secagg_threshold": server.t,
        }
    )
    kept = [u for u in updates if u.header.client_id in survivors]
    got.contributors = kept
    # sum_k p_k x_k over the survivors, divided by their sum_k p_k (DP: by the fixed k)
    denominator = divisor or sum(shares[i] for i in result.survivors)
    got.updates = layout.rebuild(kept, result.total, denominator)


def _shares(updates: list[Any], example_weighted: bool) -> list[float]:
    """Each client's share ``p_k`` of the mean (see the module docstring), in client order."""
    if not example_weighted:
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.header.num_examples for u in updates)
    return [u.header.num_examples / total for u in updates]


def _with_shares(send: Send, shares: list[float]) -> Send:
    """``send`` whose ``keys`` requests tell each participant its share."""

    def weighted(stage: str, requests: Mapping[int, dict[str, Any]]) -> dict[int, Any]:
        if stage == "keys":
            requests = {i: {**r, "weight": float(shares[i])} for i, r in requests.items()}
        return send(stage, requests)

    return weighted
