"""FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313): ``A`` frozen, only ``B`` trained and sent.

``A_0`` is the shared random start (drawn from the run seed, peft's default init) and never
changes; clients train and upload ``B`` only, half the bytes of FedIT. Because every client
shares ``A_0``, the update is linear in ``B`` and averaging is exact::

    B = sum_k p_k pad(s_k B_k)          # (out, r_max), unit scale
    B A_0 = sum_k p_k s_k B_k A_0[:r_k]  # = Delta W*, exactly

Heterogeneous ranks (not in the paper): client ``k`` trains the first ``r_k`` rows of a rank
``r_max`` ``A_0`` and its ``B`` is zero-padded, which keeps the sum exact. Components beyond
a client's rank count as zero from that client, so a component that only high-rank clients
train is shrunk by the others' weights each round (documented in docs/hetero-lora.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
)
from fedpeft.algorithms.capabilities import weighted_linear
from fedpeft.algorithms.hetero import (
    UnitGlobal,
    WeightedConfig,
    example_weights,
    one_factor_update,
    ordered,
    plans_from_global,
    ranks_for,
)
from fedpeft.algorithms.registry import register_strategy
from fedpeft.changes import clients_behind
from fedpeft.wire.messages import ClientInfo, LoraUpdate

__all__ = ["FfaLora"]


class FfaLora:
    """FFA-LoRA: shared frozen ``A``, clients send ``B`` only; exact for any ranks."""

    capabilities = staticmethod(weighted_linear("lora", heterogeneous_ranks=True))

    Config = WeightedConfig

    def __init__(self, config: WeightedConfig, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global = UnitGlobal(ctx)

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Each client trains ``B`` at its rank on the shared ``A_0[:r_k]``."""
        ranks = ranks_for(self.ctx, server_round, clients, {})
        return plans_from_global(self.ctx, self._global.adapter, ranks, parts="B")

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Weighted sum of the zero-padded, scale-folded ``B_k``; ``A_0`` unchanged."""
        ups, modules = ordered(updates, "ffa")
        weights = example_weights(ups, self.config.weighted)
        new = one_factor_update(self._global.adapter, ups, modules, weights, "B")
        return self._global.update(new, {"ffa_clients": float(clients_behind(ups))})

    def state_dict(self) -> dict[str, Any]:
        """The global adapter (``A_0`` and the averaged ``B``)."""
        return self._global.state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global adapter."""
        self._global.load(state)


register_strategy("ffa", FfaLora)
