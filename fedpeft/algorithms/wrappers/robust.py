"""Byzantine-robust aggregation that wraps any strategy (``[robust]`` in a scenario).

The wrapper sits between the coordinator and the strategy: it passes plans through, and
before the strategy aggregates it bounds or filters what the clients sent. Each LoRA update is
seen as its change to the factors it was sent, ``d_k = (A_k - A_0, B_k - B_0)`` over all
modules, flattened (``A_0``, ``B_0``: the instruction's factors).

- ``clip_norm``: ``d_k <- d_k * min(1, C / ||d_k||)`` (norm bounding; Sun et al. 2019, "Can
  you really backdoor federated learning?"; "Back to the Drawing Board", Shejwalkar et al.,
  S&P 2022, find it enough against realistic attacker fractions).
- ``median`` / ``trimmed_mean``: per coordinate over the clients' changes (Yin et al., ICML
  2018); trimmed mean cuts ``floor(trim_fraction * n)`` values from each end. The strategy then
  aggregates ONE update, ``A_0 + median(d)``, with the round's total ``num_examples``, so
  client weights play no part (a client inflating ``num_examples`` gains nothing). This needs
  every client to have been sent the same factors at the same shapes (FedAvg, FFA-LoRA,
  FLoRA with equal ranks, ...); other strategies get a clear ``AggregationError``.
- ``krum`` / ``multikrum`` (Blanchard et al., NeurIPS 2017): score each ``d_k`` by the summed
  squared distances to its ``n - f - 2`` nearest others (at least 1) and keep the best one
  (Krum) or the best ``krum_select`` (default ``n - f``; Multi-Krum); the strategy aggregates
  the kept updates unchanged, so it composes with any strategy whose updates share a shape.

Seed/scalar updates (FedKSeed, Ferret): ``scalar_clip`` clips every scalar to ``[-c, c]``;
``trimmed_mean`` works per (block, seed): among the ``m`` clients whose upload touched that
direction, the ``floor(trim_fraction * m)`` largest and smallest per-client sums contribute
nothing and the others are scaled by ``m / kept``, so that the direction's total is the
trimmed mean times ``m`` (directions touched by fewer than 3 clients are only clipped). Every
client's update still reaches the strategy, so per-client sync state stays right.

With ``rule = "mean"`` the clipping is linear per client, so the coordinator does it as it
sums the replies (:class:`fedpeft.server.fold.Fold`, streaming or batch) and this wrapper gets
the clipped mean, which it passes on; the round's ``robust_*`` counts then come from the fold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import AggregateResult, LoraPlan, Strategy
from fedpeft.changes import (
    clients_behind,
    combined_update,
    flat_change,
    shared_sent,
    summed_round,
    with_change,
)
from fedpeft.config import RobustConfig
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Adapter, ClientInfo, LoraUpdate
from fedpeft.wire.zo import ZoUpdate

__all__ = ["RobustAggregation", "krum_scores", "median", "trimmed_mean"]

LORA_ONLY = ("median", "krum", "multikrum")


def median(stack: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of ``(n, d)``; the mean of the middle two when ``n`` is even."""
    ordered, _ = torch.sort(stack, dim=0)
    n = stack.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean over dim 0 of ``(n, d)`` after cutting ``floor(fraction * n)`` from each end."""
    n = stack.shape[0]
    k = int(np.floor(fraction * n))
    ordered, _ = torch.sort(stack, dim=0)
    return ordered[k : n - k].mean(dim=0)


def krum_scores(stack: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum score of each row of ``(n, d)``: summed squared distances to its nearest others."""
    n = stack.shape[0]
    dist = torch.cdist(stack, stack).pow(2)  # (n, n)
    neighbours = max(1, n - byzantine - 2)  # byzantine >= 0 (config): at most n - 2
    dist.fill_diagonal_(float("inf"))
    nearest, _ = torch.topk(dist, neighbours, dim=1, largest=False)  # (n, neighbours)
    return nearest.sum(dim=1)


class RobustAggregation:
    """A strategy wrapped with clipping and a robust rule (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The strategy that owns the global model and aggregates what passes.
    config : RobustConfig
        The ``[robust]`` section.
    zo : bool
        Whether ``inner`` is a seed/scalar strategy.
    """

    def __init__(self, inner: Strategy, config: RobustConfig, zo: bool = False) -> None:
        self.inner = inner
        self.config = config
        self.zo = zo
        self._sent: dict[str, Adapter] = {}

    def configure_train(self, server_round: int, clients: Sequence[ClientInfo]) -> Any:
        """The inner strategy's plans; remembers which factors each client was sent."""
        plans = self.inner.configure_train(server_round, clients)
        self._sent = {
            cid: plan.adapter for cid, plan in plans.items() if isinstance(plan, LoraPlan)
        }
        return plans

    def aggregate_train(self, server_round: int, updates: Sequence[Any]) -> AggregateResult:
        """Clip, filter or combine ``updates``, then let the inner strategy aggregate."""
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        kept: Sequence[Any]
        if summed_round(ordered, self.zo):  # rule "mean": the fold clipped each update
            return self.inner.aggregate_train(server_round, ordered)  # (its row counts them)
        kept, metrics = self._zo(ordered) if self.zo else self._lora(ordered)
        result = self.inner.aggregate_train(server_round, kept)
        return replace(result, metrics={**result.metrics, **metrics})

    # ------------------------------------------------------------------ LoRA
    def _changes(self, updates: Sequence[LoraUpdate]) -> torch.Tensor:
        """The ``(n, d)`` float64 stack of the updates' changes."""
        modules = sorted(updates[0].factors)
        rows = []
        for u in updates:
            sent = self._sent.get(u.header.client_id)
            if sent is None or set(u.factors) != set(modules):
                raise AggregationError(
                    f"robust aggregation: client {u.header.client_id} sent other modules than "
                    "the others, or was not planned this round"
                )
            for m in modules:
                f, g = u.factors[m], sent[m]
                if f.a.shape != g.a.shape or f.b.shape != g.b.shape:
                    raise AggregationError(
                        f"robust aggregation needs updates of the shapes that were sent; client "
                        f"{u.header.client_id} returned {m} at A{tuple(f.a.shape)} B"
                        f"{tuple(f.b.shape)}, sent A{tuple(g.a.shape)} B{tuple(g.b.shape)} "
                        "(pruning or rank changes: use robust.rule = 'mean' with clip_norm = 0)"
                    )
            rows.append(flat_change(u.factors, sent))
        return torch.stack(rows)  # (n, d)

    def _rebuild(self, u: LoraUpdate, change: torch.Tensor) -> LoraUpdate:
        return with_change(u, self._sent[u.header.client_id], change)

    def _lora(self, updates: list[LoraUpdate]) -> tuple[list[LoraUpdate], dict[str, float]]:
        cfg = self.config
        d = self._changes(updates)
        metrics: dict[str, float] = {}
        if cfg.clip_norm > 0:
            norms = d.norm(dim=1)  # (n,)
            factor = torch.clamp(cfg.clip_norm / norms.clamp_min(1e-300), max=1.0)
            d = d * factor[:, None]
            metrics["robust_clipped"] = float((factor < 1).sum())
            metrics["robust_norm_max"] = float(norms.max())
            updates = [self._rebuild(u, d[i]) for i, u in enumerate(updates)]
        if cfg.rule in ("krum", "multikrum"):
            n = len(updates)
            keep = 1 if cfg.rule == "krum" else (cfg.krum_select or max(1, n - cfg.byzantine))
            order = torch.argsort(krum_scores(d, cfg.byzantine), stable=True)
            chosen = sorted(int(i) for i in order[: min(keep, n)])
            metrics["robust_kept"] = float(len(chosen))
            return [updates[i] for i in chosen], metrics
        if cfg.rule in ("median", "trimmed_mean"):
            sent = shared_sent(
                self._sent,
                [u.header.client_id for u in updates],
                f"robust.rule = {cfg.rule!r} combines updates of clients that were all sent the "
                "same factors; this strategy sends different ones (use krum/multikrum or "
                "clip_norm)",
            )
            combined = median(d) if cfg.rule == "median" else trimmed_mean(d, cfg.trim_fraction)
            total = sum(u.header.num_examples for u in updates)
            n = clients_behind(updates)
            return [combined_update(updates[0], sent, combined, total, n)], metrics
        return updates, metrics

    # ------------------------------------------------------------------ seed/scalar
    def _zo(self, updates: list[ZoUpdate]) -> tuple[list[ZoUpdate], dict[str, float]]:
        cfg = self.config
        scalars = [u.scalars.astype(np.float64) for u in updates]
        metrics: dict[str, float] = {}
        if cfg.scalar_clip > 0:
            clipped = sum(int((np.abs(s) > cfg.scalar_clip).sum()) for s in scalars)
            biggest = max((float(np.abs(s).max()) for s in scalars if len(s)), default=0.0)
            scalars = [np.clip(s, -cfg.scalar_clip, cfg.scalar_clip) for s in scalars]
            metrics["robust_clipped"] = float(clipped)
            metrics["robust_scalar_max"] = biggest
        if cfg.rule == "trimmed_mean":
            scalars, trimmed = _trim_per_direction(updates, scalars, cfg.trim_fraction)
            metrics["robust_trimmed"] = float(trimmed)
        out = [
            replace(u, scalars=s.astype(u.scalars.dtype))
            for u, s in zip(updates, scalars, strict=True)
        ]
        return out, metrics

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state (the wrapper keeps none across rounds)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the inner strategy."""
        self.inner.load_state_dict(state)


def _trim_per_direction(
    updates: Sequence[ZoUpdate], scalars: list[np.ndarray], fraction: float
) -> tuple[list[np.ndarray], int]:
    """Scale each client's scalars per direction: 0 if trimmed, ``m / kept`` if kept."""
    keys = []
    sums: dict[int, dict[int, float]] = defaultdict(dict)  # direction -> client -> sum
    for i, (u, s) in enumerate(zip(updates, scalars, strict=True)):
        blocks = u.blocks.astype(np.int64) if len(u.blocks) else np.zeros(len(s), np.int64)
        k = blocks * (2**32) + u.seeds.astype(np.int64)  # (pairs,) direction ids
        keys.append(k)
        for key, value in zip(k.tolist(), s.tolist(), strict=True):
            sums[key][i] = sums[key].get(i, 0.0) + value
    factor: dict[tuple[int, int], float] = {}
    trimmed = 0
    for key, per_client in sums.items():
        m = len(per_client)
        cut = int(np.floor(fraction * m))
        if m < 3 or cut == 0:
            continue
        ranked = sorted(per_client, key=lambda c: (per_client[c], c))
        for c in ranked[:cut] + ranked[m - cut :]:
            factor[(key, c)] = 0.0
        for c in ranked[cut : m - cut]:
            factor[(key, c)] = m / (m - 2 * cut)
        trimmed += 2 * cut
    out = []
    for i, (k, s) in enumerate(zip(keys, scalars, strict=True)):
        scale = np.array([factor.get((key, i), 1.0) for key in k.tolist()])
        out.append(s * scale)
    return out, trimmed
