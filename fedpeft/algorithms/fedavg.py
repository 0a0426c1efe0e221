"""FedAvg on LoRA factors, as in FedIT (Zhang et al., ICASSP 2024, arXiv:2305.05644).

Every client starts from the global factors and returns its trained ``A_k (r, in)`` and
``B_k (out, r)``. The coordinator averages each factor on its own, weighted by the clients'
example counts ``p_k = n_k / sum_j n_j`` (McMahan et al. 2017, arXiv:1602.05629)::

    A = sum_k p_k A_k        # (r, in)
    B = sum_k p_k B_k        # (out, r)

Note that this is **not** the average of the clients' updates: ``B A = sum_i sum_j p_i p_j
B_i A_j`` contains cross terms ``B_i A_j`` (i != j) that no client trained, so in general
``B A != sum_k p_k B_k A_k``. It equals that ideal only when all clients share the same ``A``
or the same ``B`` (for instance in the very first local step from ``B = 0``). The
heterogeneous-rank strategies (FLoRA, FFA-LoRA, ...) exist to close that gap; this one is the
baseline every LoRA-FL paper compares against and needs equal ranks on all clients.

Accumulation is in float64 over clients sorted by id, so the result does not depend on the
order in which replies arrive.
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
    weights_of,
)
from fedpeft.algorithms.capabilities import weighted_linear
from fedpeft.algorithms.registry import register_strategy
from fedpeft.changes import clients_behind
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraUpdate

__all__ = ["FedAvg"]


class FedAvg:
    """FedIT: example-weighted average of LoRA ``A`` and ``B`` separately (equal ranks).

    Parameters
    ----------
    config : FedAvg.Config
        Options.
    ctx : StrategyContext
        Initial adapter, spec and seed.
    """

    capabilities = staticmethod(weighted_linear("lora"))

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedAvg`."""

        weighted: bool = True  # weight clients by num_examples (False: plain mean)

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global: Adapter = ctx.initial

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Every sampled client trains the global adapter at the run's rank."""
        plan = LoraPlan(spec=self.ctx.spec, adapter=self._global)
        return {c.client_id: plan for c in clients}

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Weighted mean of each factor; raises ``AggregationError`` on unequal shapes."""
        check_same_structure(updates, "fedavg")
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        weights = (
            weights_of(ordered) if self.config.weighted else [1.0 / len(ordered)] * len(ordered)
        )
        out: dict[str, LoraFactors] = {}
        for module in sorted(ordered[0].factors):
            first = ordered[0].factors[module]
            a = torch.zeros(first.a.shape, dtype=torch.float64)  # (r, in)
            b = torch.zeros(first.b.shape, dtype=torch.float64)  # (out, r)
            for w, u in zip(weights, ordered, strict=True):
                f = u.factors[module]
                a += w * f.a.double()
                b += w * f.b.double()
            out[module] = LoraFactors(
                a=a.to(first.a.dtype), b=b.to(first.b.dtype), alpha=first.alpha
            )
        self._global = out
        return AggregateResult(
            adapter=out,
            spec=self.ctx.spec,
            metrics={"fedavg_clients": float(clients_behind(ordered))},
        )

    def state_dict(self) -> dict[str, Any]:
        """The global adapter."""
        return {"global": adapter_state(self._global)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global adapter."""
        self._global = adapter_from_state(state["global"])


register_strategy("fedavg", FedAvg)
