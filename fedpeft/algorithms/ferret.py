"""Ferret (Shu et al. 2024, arXiv:2409.06277): first-order local steps, shared-randomness upload.

Each client trains with SGD, projects its update block-wise on directions from the shared
pool of K seeds and uploads only the projection coefficients ``(block, seed, c)`` (see
:mod:`fedpeft.zo.local`, where the reconstruction ``sum_j c_{b,j} z_{b,j}`` is unbiased). The
coordinator accumulates

    coeffs[b, k] += server_lr * sum_i p_i * c_{i,b,k}       p_i = n_i / sum_j n_j

so the global model is ``theta_0 - sum_{b,k} coeffs[b, k] z_{b,k}`` and a client syncs with at
most K regenerations of the tuned tensors. With unbiased reconstruction ``server_lr = 1`` is
FedAvg of the clients' updates in expectation; the reference implementation needs about 10
because its directions reconstruct a third of the update and it clips each reconstructed
direction to norm 10 (not done here). Server momentum (the reference's ``--momentum``, 0 in
its published script) is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedpeft.algorithms.base import AggregateResult, StrategyContext, ZoGlobal, ZoPlan
from fedpeft.algorithms.capabilities import Capabilities, weighted_linear
from fedpeft.algorithms.registry import register_strategy
from fedpeft.algorithms.zo_state import Coefficients
from fedpeft.changes import folded_mean
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import ClientInfo
from fedpeft.wire.zo import ZoUpdate
from fedpeft.zo.trainer import ZoTrainer

__all__ = ["Ferret"]


class Ferret:
    """Ferret: projected first-order updates on K shared random directions per block."""

    @staticmethod
    def capabilities(config: Ferret.Config) -> Capabilities:
        """Linear in the clients' (clipped) scalars."""
        return replace(
            weighted_linear("zo", codecs=frozenset({"none"}))(config),
            scalar_clip=config.scalar_clip,
        )

    zo_algorithm = "ferret"
    trainer = ZoTrainer()  # the shared seed/scalar client loop, unmasked

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`Ferret`."""

        server_lr: float = 1.0  # scale of the aggregated reconstruction
        weighted: bool = True  # weight clients by num_examples (False: equal weights)
        scalar_clip: float = 0.0  # clip |c| before accumulating (0: no clipping)

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        if ctx.zo is None:
            raise AggregationError("strategy 'ferret' needs a zeroth-order spec ([zo] section)")
        self.config = config
        self.ctx = ctx
        self.spec = ctx.zo
        self.state = Coefficients(ctx.zo_blocks, ctx.zo.num_seeds)

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, ZoPlan]:
        """Each client gets the coefficient changes since its last sync."""
        plans = {
            c.client_id: ZoPlan(
                self.spec, self.state.sync_for(c.client_id, self.spec.sync == "full")
            )
            for c in clients
        }
        for c in clients:
            self.state.client_versions.pop(c.client_id, None)
        return plans

    def aggregate_train(self, server_round: int, updates: Sequence[ZoUpdate]) -> AggregateResult:
        """Accumulate ``server_lr * p_i * c`` per (block, seed)."""
        if not updates:
            raise AggregationError("strategy 'ferret' got no updates to aggregate")
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        total = sum(u.header.num_examples for u in ordered)
        delta = np.zeros((self.state.num_blocks, self.spec.num_seeds))
        mean = folded_mean(ordered, self.state.num_blocks, self.spec.num_seeds)
        for u in ordered if mean is None else ():
            if len(u.blocks) != len(u.seeds) or (
                len(u.blocks) and u.blocks.max() >= self.state.num_blocks
            ):
                last = self.state.num_blocks - 1
                raise AggregationError(
                    f"client {u.header.client_id} sent block indices outside 0..{last}"
                )
            p = u.header.num_examples / total if self.config.weighted else 1 / len(ordered)
            c = u.scalars.astype(np.float64)
            if self.config.scalar_clip > 0:
                c = np.clip(c, -self.config.scalar_clip, self.config.scalar_clip)
            np.add.at(
                delta,
                (u.blocks.astype(np.int64), u.seeds.astype(np.int64)),
                self.config.server_lr * p * c,
            )
        if mean is not None:  # the replies' exact mean, each scalar clipped as it was summed
            delta = self.config.server_lr * mean
        changed = self.state.commit(delta, server_round)
        for u in ordered:
            self.state.client_versions[u.header.client_id] = u.synced_version
        return AggregateResult(
            zo=ZoGlobal(self.spec, server_round, self.state.published),
            metrics={"zo_changed_entries": float(changed)},
        )

    def state_dict(self) -> dict[str, Any]:
        """Coefficients and versions."""
        return {"coeffs": self.state.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.state.load_state_dict(state["coeffs"])


register_strategy("ferret", Ferret)
