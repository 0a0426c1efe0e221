"""FLoRA (Wang et al., NeurIPS 2024, arXiv:2409.05976): stack client factors, exact for any ranks.

Each round every client trains a **fresh** LoRA of its rank on top of the base model with all
earlier global updates merged in, and the coordinator stacks what comes back::

    B = [s_1 B_1 | s_2 B_2 | ... ]   # (out, R_t), R_t = sum_k r_k
    A = [p_1 A_1; p_2 A_2; ... ]     # (R_t, in)
    B A = sum_k p_k s_k B_k A_k      # = Delta W*, exactly, no padding

The global model is the concatenation of every round's stack (unit scale, rank
``sum_t R_t``): it is what is evaluated and saved (a valid peft adapter), and it is what each
client merges into its frozen base weights before training (``LoraPlan.base``; merged for
the round and restored bit for bit afterwards, so one shared model serves many clients).

Download size: clients here keep no state between rounds (they may run on any worker), so
each instruction carries the whole stack so far, ``sum_t R_t (out + in)`` values per module,
growing linearly with rounds (4 bytes each). The paper's clients keep their merged base and
receive only the newest stack; a stateful variant would download ``R_t (out + in)`` per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
    adapter_from_state,
    adapter_state,
)
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.hetero import (
    WeightedConfig,
    example_weights,
    ordered,
    plans_by_rank,
    ranks_for,
    shapes_of,
    stacked_updates,
)
from fedpeft.algorithms.registry import register_strategy
from fedpeft.lora.handle import init_factors
from fedpeft.lora.rank_ops import unit_spec
from fedpeft.seeding import derive_seed
from fedpeft.wire.messages import Adapter, ClientInfo, LoraUpdate

__all__ = ["FLora"]


class FLora:
    """FLoRA: fresh LoRA per round, stacked aggregation, global merged into the base."""

    capabilities = Capabilities(family="lora", heterogeneous_ranks=True, merges_base=True)

    Config = WeightedConfig

    def __init__(self, config: WeightedConfig, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._stack: Adapter | None = None  # every round's stack, unit scale

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Fresh factors at each client's rank (seeded by the round), the stack as the base."""
        ranks = ranks_for(self.ctx, server_round, clients, {})
        seed = derive_seed(self.ctx.seed, "flora-init", server_round)
        shapes = shapes_of(self.ctx.initial)
        return plans_by_rank(
            self.ctx, ranks, lambda spec: init_factors(shapes, spec, seed), base=self._stack
        )

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Append this round's stack to the global one."""
        ups, modules = ordered(updates, "flora")
        weights = example_weights(ups, self.config.weighted)
        out = stacked_updates(ups, modules, weights, previous=self._stack)
        self._stack = out
        rank = next(iter(out.values())).rank
        return AggregateResult(
            adapter=out,
            spec=unit_spec(self.ctx.spec, rank),
            metrics={"flora_clients": float(len(ups)), "flora_global_rank": float(rank)},
        )

    def state_dict(self) -> dict[str, Any]:
        """The stack so far (or nothing before round 1)."""
        return {"stack": adapter_state(self._stack) if self._stack is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the stack."""
        s = state.get("stack")
        self._stack = adapter_from_state(s) if s is not None else None


register_strategy("flora", FLora)
