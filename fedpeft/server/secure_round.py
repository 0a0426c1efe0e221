"""Secure aggregation inside a round: replace the clients' replies by their secure sum.

With ``secagg.enabled`` every instruction is marked ``secure``: the clients train, keep their
contribution and reply with the header only (validated as usual). The coordinator then runs a
session (:mod:`fedpeft.secagg`) among the clients whose replies were valid and hands the
strategy what the sum allows:

- LoRA (fedavg, ffa; all clients were sent the same factors): ONE update, the sent factors
  plus the clients' mean change, with the round's total ``num_examples``. Only the trained
  coordinates are summed (FFA-LoRA: ``B``); the frozen ones keep exactly their sent value.
  The mean is unweighted: the coordinator never sees a client's change, so it cannot
  weight it.
- Seed/scalar (fedkseed, ferret): every survivor's update, all with weight 1 and no pairs,
  plus the summed scalars of every (block, seed) direction carried on the first one, so the
  strategy's per-direction ``sum_k g_k / m`` is the clients' mean and each client's synced
  version is still recorded.

A client that drops during the session counts as a failure of the round (``timeout``); a
session that cannot finish (too few shares or survivors) is a ``RoundError``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid

from fedpeft.changes import combined_update, shared_sent, trained_mask, with_every_direction
from fedpeft.config import RunConfig
from fedpeft.errors import ProtocolError, RoundError
from fedpeft.secagg.flower import grid_transport, reply_limit
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.session import run_session
from fedpeft.server.exchange import Exchange, Instruction
from fedpeft.wire import TrainInstruction
from fedpeft.wire_zo import ZoInstruction

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
) -> None:
    """Run the session and replace ``got.updates`` (see the module docstring).

    ``divisor``: the mean's denominator (default: the survivors; with DP the expected
    clients per round, so the sensitivity stays ``C / k`` when clients drop).
    """
    updates = sorted(got.updates, key=lambda u: u.header.client_id)
    if not updates:
        return
    cids = [u.header.client_id for u in updates]
    first = instructions[cids[0]]
    if isinstance(first, ZoInstruction):
        dim = zo_blocks * first.spec.num_seeds
    else:
        sent = shared_sent(
            {c: i.adapter for c, i in instructions.items() if isinstance(i, TrainInstruction)},
            cids,
            "secure aggregation sums changes of clients sent the same factors (use fedavg or ffa)",
        )
        trained = trained_mask(sent, first.parts)  # only these coordinates are summed
        dim = int(trained.sum())
    sc, n = cfg.secagg, len(cids)
    if n < 2:
        raise RoundError(server_round, "secure aggregation needs at least 2 valid updates")
    k = min(sc.neighbours, n - 1) if sc.neighbours else 0
    t = min(sc.threshold, k or n - 1) if sc.threshold else 0
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
        result = run_session(server, send)
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
    divisor = divisor or len(kept)
    if isinstance(first, ZoInstruction):
        total = result.total * (len(kept) / divisor)  # the strategy divides by len(kept)
        got.updates = _zo_updates(kept, total, zo_blocks, first.spec.num_seeds)
        return
    change = torch.zeros(trained.shape, dtype=torch.float64)
    change[trained] = torch.from_numpy(result.total / divisor)
    examples = sum(u.header.num_examples for u in kept)
    got.updates = [combined_update(kept[0], sent, change, examples)]


def _zo_updates(kept: list[Any], total: np.ndarray, blocks: int, num_seeds: int) -> list[Any]:
    out = [replace(u, header=replace(u.header, num_examples=1)) for u in kept]
    out[0] = with_every_direction(out[0], total, blocks, num_seeds)  # replies carry no pairs
    return out
