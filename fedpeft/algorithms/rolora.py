"""RoLoRA (Chen et al., NeurIPS 2025, arXiv:2502.01755): alternate which LoRA factor trains.

Odd rounds: ``A`` frozen and shared, clients train and send ``B``; even rounds: ``B`` frozen,
clients train and send ``A``. Within a round the update is linear in the trained factor, so
the average is exact every round (the product of the averages is the average of products)::

    odd:  B = sum_k p_k pad(s_k B_k)   ->  B A   = sum_k p_k s_k B_k A[:r_k]
    even: A = sum_k p_k pad(A_k)       ->  B~ A  = sum_k p_k B~[:, :r_k] A_k

Each round uploads one factor (half of FedIT's bytes) while both factors learn, unlike
FFA-LoRA. Heterogeneous ranks are handled as in :mod:`fedpeft.algorithms.ffa` (zero-padding
of the trained factor; not in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
)
from fedpeft.algorithms.capabilities import weighted_linear
from fedpeft.algorithms.hetero import (
    UnitGlobal,
    example_weights,
    one_factor_update,
    ordered,
    plans_from_global,
    ranks_for,
)
from fedpeft.algorithms.registry import register_strategy
from fedpeft.changes import clients_behind
from fedpeft.errors import ConfigError
from fedpeft.wire.messages import ClientInfo, LoraUpdate

__all__ = ["RoLora"]


class RoLora:
    """RoLoRA: train ``B`` in odd rounds, ``A`` in even rounds; exact averaging each round."""

    capabilities = staticmethod(weighted_linear("lora", heterogeneous_ranks=True))

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`RoLora`."""

        weighted: bool = True  # weight clients by num_examples (False: plain mean)
        first: str = "B"  # the factor trained in round 1 (B, as in the paper, starts from B=0)

        def __post_init__(self) -> None:
            if self.first not in ("A", "B"):
                raise ConfigError(f"strategy.options.first must be 'A' or 'B', got {self.first!r}")

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global = UnitGlobal(ctx)

    def part(self, server_round: int) -> str:
        """The factor trained in ``server_round``."""
        other = "A" if self.config.first == "B" else "B"
        return self.config.first if server_round % 2 == 1 else other

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Each client trains this round's factor at its rank."""
        ranks = ranks_for(self.ctx, server_round, clients, {})
        return plans_from_global(
            self.ctx, self._global.adapter, ranks, parts=self.part(server_round)
        )

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Average this round's factor (zero-padded, unit scale); keep the other."""
        ups, modules = ordered(updates, "rolora")
        weights = example_weights(ups, self.config.weighted)
        part = self.part(server_round)
        new = one_factor_update(self._global.adapter, ups, modules, weights, part)
        metrics = {
            "rolora_clients": float(clients_behind(ups)),
            "rolora_trained_b": float(part == "B"),
        }
        return self._global.update(new, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The global adapter."""
        return self._global.state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global adapter."""
        self._global.load(state)


register_strategy("rolora", RoLora)
