"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv:2402.11505): exact average, SVD back to each rank.

The coordinator forms the ideal update ``Delta W* = sum_k p_k s_k B_k A_k`` and gives each
client of rank ``r`` its best rank-``r`` approximation (Eckart-Young): ``Delta W* = U S V^T``,
``B = U_r S_r / s_r``, ``A = V_r^T`` (the reference code puts ``S`` in ``B`` too).

Deviation that changes cost, not results: the reference builds the dense (out, in)
``Delta W*`` and runs a full SVD per layer each round. Here ``Delta W*`` is kept as FLoRA-style
stacked factors ``B = [s_1 B_1 | ...]``, ``A = [p_1 A_1; ...]`` of rank ``R = sum r_k`` (exact;
it is also the global model that is evaluated and saved), and the SVD comes from a QR of each
stack and an SVD of the small (R, R) core (:func:`fedpeft.lora.rank_ops.svd_from_stacks`), giving
the same singular values (tested against the dense SVD).
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
)
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.hetero import (
    client_spec,
    example_weights,
    initial_unit,
    ordered,
    plans_by_rank,
    plans_from_global,
    ranks_for,
    stacked_updates,
)
from fedpeft.algorithms.nested import NESTED, nested_round
from fedpeft.algorithms.registry import register_strategy
from fedpeft.client.trainer import LoraTrainer
from fedpeft.lora.rank_ops import svd_from_stacks, unit_spec
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraUpdate

__all__ = ["FlexLora"]


class FlexLora:
    """FlexLoRA: exact weighted sum of client products, truncated SVD to each client's rank."""

    capabilities = Capabilities(family="lora", heterogeneous_ranks=True)
    trainer = LoraTrainer(begin=nested_round)  # the client half: nested-rank training on option

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FlexLora`."""

        weighted: bool = True  # weight clients by num_examples (False: plain mean)
        nested: bool = False  # DyLoRA-style nested-rank training (fedpeft.algorithms.nested)

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global: Adapter | None = None  # stacked, unit scale; None until round 1 ends
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if module not in self._svd:
            assert self._global is not None
            g = self._global[module]
            self._svd[module] = svd_from_stacks(g.a, g.b * g.scale)
        return self._svd[module]

    def for_rank(self, rank: int) -> dict[str, LoraFactors]:
        """The best rank-``rank`` factors of the global update, in that client's scale."""
        assert self._global is not None
        spec = client_spec(self.ctx, rank)
        s = spec.alpha / rank
        out: dict[str, LoraFactors] = {}
        for m in sorted(self._global):
            u, sv, v = self._factors(m)  # (out, R), (R,), (in, R)
            k = min(rank, sv.numel())
            b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
            a = torch.zeros(rank, v.shape[0], dtype=torch.float64)
            b[:, :k] = u[:, :k] * sv[:k] / s  # (out, k)
            a[:k] = v[:, :k].T  # (k, in)
            out[m] = LoraFactors(a=a.float(), b=b.float(), alpha=spec.alpha)
        return out

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Round 1: the initial adapter at each rank; later: the SVD truncation of the global."""
        ranks = ranks_for(self.ctx, server_round, clients, {})
        options = {NESTED: True} if self.config.nested else {}
        if self._global is None:
            init = initial_unit(self.ctx, self.ctx.rank_policy().max_rank)
            return plans_from_global(self.ctx, init, ranks, options=options)
        return plans_by_rank(
            self.ctx, ranks, lambda spec: self.for_rank(spec.rank), options=options
        )

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Stack the clients' factors: the global is ``Delta W*`` exactly, at rank ``sum r_k``."""
        ups, modules = ordered(updates, "flexlora")
        weights = example_weights(ups, self.config.weighted)
        out = stacked_updates(ups, modules, weights)  # (R, in), (out, R) per module
        self._global, self._svd = out, {}
        rank = next(iter(out.values())).rank
        return AggregateResult(
            adapter=out,
            spec=unit_spec(self.ctx.spec, rank),
            metrics={"flexlora_clients": float(len(ups)), "flexlora_global_rank": float(rank)},
        )

    def state_dict(self) -> dict[str, Any]:
        """The stacked global update (or nothing before round 1)."""
        return {"global": adapter_state(self._global) if self._global is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the stacked global update."""
        g = state.get("global")
        self._global = adapter_from_state(g) if g is not None else None
        self._svd = {}


register_strategy("flexlora", FlexLora)
