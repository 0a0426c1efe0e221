"""Coordinate-wise median of LoRA factors: an out-of-tree fedpeft strategy, as a user writes one.

Use it from a scenario without installing anything::

    [strategy]
    name = "strategies/median.py:CoordinateMedian"

Each entry of ``A`` and ``B`` becomes the median of the clients' values for that entry
(Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates"). Unlike the weighted mean it ignores ``num_examples`` and tolerates a minority of
clients sending arbitrary values. Like FedIT it averages the factors separately, so it shares
FedIT's cross-term inexactness, and it needs equal ranks. With an even number of clients the
median is the mean of the two middle values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
    adapter_from_state,
    adapter_state,
    check_same_structure,
)
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraUpdate


def _median(stack: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of ``(K, ...)``; the mean of the middle two when K is even."""
    ordered, _ = torch.sort(stack, dim=0)
    k = stack.shape[0]
    if k % 2:
        return ordered[k // 2]
    return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class CoordinateMedian:
    """Coordinate-wise median of each LoRA factor across clients (equal ranks)."""

    # Not linear (a median is not a mean of changes), ignores num_examples, one rank for all,
    # any upload codec.
    capabilities = Capabilities(family="lora", example_weighted=False)

    @dataclass(frozen=True)
    class Config:
        """No options."""

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global: Adapter = ctx.initial

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Every sampled client trains the global adapter."""
        plan = LoraPlan(spec=self.ctx.spec, adapter=self._global)
        return {c.client_id: plan for c in clients}

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Median of every coordinate of ``A`` (r, in) and ``B`` (out, r)."""
        check_same_structure(updates, "median")
        out: dict[str, LoraFactors] = {}
        for module in sorted(updates[0].factors):
            first = updates[0].factors[module]
            a = _median(torch.stack([u.factors[module].a.double() for u in updates]))  # (r, in)
            b = _median(torch.stack([u.factors[module].b.double() for u in updates]))  # (out, r)
            out[module] = LoraFactors(
                a=a.to(first.a.dtype), b=b.to(first.b.dtype), alpha=first.alpha
            )
        self._global = out
        return AggregateResult(adapter=out, spec=self.ctx.spec)

    def state_dict(self) -> dict[str, Any]:
        """The global adapter."""
        return {"global": adapter_state(self._global)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global adapter."""
        self._global = adapter_from_state(state["global"])
