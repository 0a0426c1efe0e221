"""Shared pieces of the heterogeneous-rank strategies: per-client plans and padded sums.

Global adapters here are kept in unit scale (see :mod:`fedpeft.lora.rank_ops`): ``alpha = rank``,
the LoRA scale folded into ``B``. A client of rank ``r_k`` trains its own ``alpha / r_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
    adapter_from_state,
    adapter_state,
    weights_of,
)
from fedpeft.lora.handle import init_factors
from fedpeft.lora.rank_ops import check_modules, for_client, pad, stack, unit_scale, unit_spec
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraSpec, LoraUpdate

__all__ = [
    "UnitGlobal",
    "WeightedConfig",
    "client_spec",
    "example_weights",
    "initial_unit",
    "one_factor_update",
    "ordered",
    "padded_sum",
    "plans_by_rank",
    "plans_from_global",
    "ranks_for",
    "shapes_of",
    "stacked_updates",
]


@dataclass(frozen=True)
class WeightedConfig:
    """Options of a strategy whose only choice is how clients are weighted."""

    weighted: bool = True  # weight clients by num_examples (False: plain mean)


class UnitGlobal:
    """A padded strategy's global adapter: unit scale at the policy's ``max_rank``, built on
    first use, and the :class:`AggregateResult` and state that go with it."""

    def __init__(self, ctx: StrategyContext, rank: int | None = None) -> None:
        self.ctx = ctx
        self.rank = rank  # None: the rank policy's max_rank
        self._adapter: Adapter | None = None

    @property
    def adapter(self) -> Adapter:
        """The current global adapter."""
        if self._adapter is None:
            rank = self.rank if self.rank is not None else self.ctx.rank_policy().max_rank
            self._adapter = initial_unit(self.ctx, rank)
        return self._adapter

    def update(self, adapter: Adapter, metrics: dict[str, float]) -> AggregateResult:
        """Make ``adapter`` the global one and describe it."""
        self._adapter = adapter
        rank = next(iter(adapter.values())).rank
        return AggregateResult(
            adapter=adapter, spec=unit_spec(self.ctx.spec, rank), metrics=metrics
        )

    def state(self) -> dict[str, Any]:
        """``{"global": ...}`` for a strategy's ``state_dict``."""
        return {"global": adapter_state(self.adapter)}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self._adapter = adapter_from_state(state["global"])


def shapes_of(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every module of ``adapter``."""
    return {m: (int(f.b.shape[0]), int(f.a.shape[1])) for m, f in adapter.items()}


def initial_unit(ctx: StrategyContext, rank: int) -> dict[str, LoraFactors]:
    """The starting global adapter at ``rank`` in unit scale (``B = 0``).

    The context's initial adapter when it already has that rank, otherwise peft's default
    init drawn from the run seed (whose first rows equal the run-rank init).
    """
    first = next(iter(ctx.initial.values()))
    if first.rank == rank:
        base: Adapter = ctx.initial
    else:
        base = init_factors(shapes_of(ctx.initial), replace(ctx.spec, rank=rank), ctx.seed)
    spec = unit_spec(ctx.spec, rank)
    return {
        m: LoraFactors(a=f.a.float().clone(), b=f.b.float() * f.scale, alpha=spec.alpha)
        for m, f in sorted(base.items())
    }


def client_spec(ctx: StrategyContext, rank: int) -> LoraSpec:
    """The spec a client of ``rank`` trains: the run's alpha, targets and dropout."""
    return replace(ctx.spec, rank=rank)


def ranks_for(
    ctx: StrategyContext, server_round: int, clients: Sequence[ClientInfo], caps: dict[str, int]
) -> dict[str, int]:
    """The policy's ranks, capped by ``caps`` (e.g. self-pruned ranks) and the policy max."""
    policy = ctx.rank_policy()
    assigned = policy.assign(server_round, clients)
    return {
        c.client_id: min(assigned[c.client_id], caps.get(c.client_id, policy.max_rank))
        for c in clients
    }


def ordered(updates: Sequence[LoraUpdate], strategy: str) -> tuple[list[LoraUpdate], list[str]]:
    """Updates sorted by client id, and their common module list (or ``AggregationError``)."""
    ups = sorted(updates, key=lambda u: u.header.client_id)
    modules = check_modules({u.header.client_id: u.factors for u in ups}, strategy)
    return ups, modules


def padded_sum(
    updates: Sequence[LoraUpdate], module: str, weights: Sequence[float], rank: int, part: str
) -> torch.Tensor:
    """``sum_k w_k pad(X_k)`` for ``X = s B`` (``part='B'``, (out, rank)) or ``A`` ((rank, in))."""
    total: torch.Tensor | None = None
    for w, u in zip(weights, updates, strict=True):
        a, b = unit_scale(u.factors[module])
        x = pad(b, rank, 1) if part == "B" else pad(a, rank, 0)
        total = w * x if total is None else total + w * x
    if total is None:
        raise ValueError("padded_sum of no updates")
    return total


def example_weights(updates: Sequence[LoraUpdate], weighted: bool) -> list[float]:
    """``n_k / sum n`` (or equal shares)."""
    return weights_of(updates) if weighted else [1.0 / len(updates)] * len(updates)


def plans_by_rank(
    ctx: StrategyContext,
    ranks: dict[str, int],
    adapter_for: Callable[[LoraSpec], Adapter],
    parts: str = "AB",
    base: Adapter | None = None,
    options: Mapping[str, bool | int | float | str] | None = None,
) -> dict[str, LoraPlan]:
    """One plan per distinct rank (its adapter built once, so encoded once), shared by the
    clients of that rank; ``adapter_for`` gives the starting factors of a client spec;
    ``options``: the algorithm's values for its client half, the same for every client."""
    by_rank: dict[int, LoraPlan] = {}
    out: dict[str, LoraPlan] = {}
    for cid, r in sorted(ranks.items()):
        if r not in by_rank:
            spec = client_spec(ctx, r)
            by_rank[r] = LoraPlan(
                spec=spec,
                adapter=adapter_for(spec),
                parts=parts,
                base=base,
                options=dict(options or {}),
            )
        out[cid] = by_rank[r]
    return out


def plans_from_global(
    ctx: StrategyContext,
    global_: Adapter,
    ranks: dict[str, int],
    parts: str = "AB",
    options: Mapping[str, bool | int | float | str] | None = None,
) -> dict[str, LoraPlan]:
    """Each client gets the first ``r_k`` components of the unit-scale global, in its scale
    (``options``: the algorithm's values for its client half)."""
    return plans_by_rank(ctx, ranks, lambda spec: for_client(global_, spec), parts, options=options)


def stacked_updates(
    updates: Sequence[LoraUpdate],
    modules: Sequence[str],
    weights: Sequence[float],
    previous: Adapter | None = None,
) -> dict[str, LoraFactors]:
    """FLoRA stacking of every module (unit scale, ``alpha = rank``), after ``previous``'s stack."""
    out: dict[str, LoraFactors] = {}
    for m in modules:
        a, b = stack([u.factors[m] for u in updates], weights)  # (R_t, in), (out, R_t)
        if previous is not None:
            old = previous[m]
            a = torch.cat([old.a.double(), a], dim=0)  # (R, in)
            b = torch.cat([old.b.double() * old.scale, b], dim=1)  # (out, R)
        out[m] = LoraFactors(a=a.float(), b=b.float(), alpha=float(a.shape[0]))
    return out


def one_factor_update(
    global_: Adapter,
    updates: Sequence[LoraUpdate],
    modules: Sequence[str],
    weights: Sequence[float],
    part: str,
) -> dict[str, LoraFactors]:
    """Average the trained factor ``part`` (zero-padded), keep the global's other factor.

    With the other factor shared, the update is linear in the trained one, so the result's
    product is exactly ``sum_k p_k s_k B_k A_k`` (FFA-LoRA, RoLoRA).
    """
    out: dict[str, LoraFactors] = {}
    for m in modules:
        g = global_[m]
        if part == "B":
            b = padded_sum(updates, m, weights, g.rank, "B")  # (out, r_max)
            out[m] = LoraFactors(a=g.a.clone(), b=b.float(), alpha=g.alpha)
        else:
            a = padded_sum(updates, m, weights, g.rank, "A")  # (r_max, in)
            out[m] = LoraFactors(a=a.float(), b=g.b.clone(), alpha=g.alpha)
    return out
