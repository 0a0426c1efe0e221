"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024, arXiv:2312.06353).

Federated full-parameter (or LoRA-only) tuning where clients and coordinator exchange only
seed indices and scalars. A pool of K seeds is derived from the run seed; each client runs
``zo.local_steps`` two-point ZO-SGD steps (see :mod:`fedpeft.zo.local`) and uploads its
``(seed index, projected gradient)`` pairs. The coordinator accumulates, per seed,

    coeffs[k] += lr * sum_i p_i * sum_{t: k_t = k} clip(g_{i,t})      p_i = n_i / sum_j n_j

so the global model is ``theta_0 - sum_k coeffs[k] z_k``. This equals FedAvg of the clients'
local updates exactly, because each local update is ``-lr * sum_t g_t z_{k_t}``. A client syncs
by regenerating only the seeds whose coefficient changed since its last sync (at most K,
however many rounds it missed).

FedKSeed-Pro samples seeds with probabilities ``softmax(minmax(mean_k |clip(g)|))`` from the
scalars seen so far (seeds never seen count 0), as in the reference code; the coordinator keeps
running sums instead of the reference's ever-growing history lists, and sends the K
probabilities (4 bytes each) with each instruction.

Deviations: scalars are clipped to ``zo.scalar_clip`` before they count (0 disables); non-finite
scalars and indices outside the pool are rejected by the coordinator before this code sees them.
When the coordinator sums the replies itself (streaming, or any round without per-client
wrappers, see :mod:`fedpeft.server.fold`) the strategy gets that exact mean of the clipped
scalars (:class:`fedpeft.changes.FoldedZo`) and adds ``lr`` times it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.algorithms.base import AggregateResult, StrategyContext, ZoGlobal, ZoPlan
from fedpeft.algorithms.capabilities import Capabilities, weighted_linear
from fedpeft.algorithms.registry import register_strategy
from fedpeft.algorithms.zo_state import Coefficients
from fedpeft.changes import folded_mean
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import ClientInfo
from fedpeft.wire.zo import ZoSpec, ZoUpdate
from fedpeft.zo.trainer import ZoTrainer

__all__ = ["FedKSeed", "FedKSeedPro", "pro_probabilities"]


def pro_probabilities(abs_sum: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``softmax(minmax(mean |g|))`` over the pool; uniform before any scalar was seen."""
    mean = np.divide(abs_sum, counts, out=np.zeros_like(abs_sum), where=counts > 0)
    lo, hi = mean.min(), mean.max()
    logits = (mean - lo) / (hi - lo) if hi > lo else np.zeros_like(mean)
    e = np.exp(logits - logits.max())
    probs: np.ndarray = e / e.sum()
    return probs


def _zo_spec(ctx: StrategyContext, name: str) -> ZoSpec:
    if ctx.zo is None:
        raise AggregationError(f"strategy {name!r} needs a zeroth-order spec ([zo] section)")
    return ctx.zo


class FedKSeed:
    """FedKSeed: seed/scalar federated ZO tuning with a fixed pool of K seeds."""

    zo_algorithm = "fedkseed"
    trainer = ZoTrainer()  # the shared seed/scalar client loop, unmasked

    @staticmethod
    def capabilities(config: FedKSeed.Config) -> Capabilities:
        """Pro's seed sampling uses each client's per-seed magnitudes (not covered by DP)."""
        return Capabilities(
            family="zo",
            linear=True,
            example_weighted=config.weighted,
            client_statistics=config.pro,
            codecs=frozenset({"none"}),
            scalar_clip=config.scalar_clip,
        )

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedKSeed`."""

        pro: bool = False  # FedKSeed-Pro: importance-weighted seed sampling
        weighted: bool = True  # weight clients by num_examples (False: equal weights)
        scalar_clip: float = 100.0  # clip |g| to this before accumulating (0: no clipping)

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self.spec = _zo_spec(ctx, "fedkseed")
        self.state = Coefficients(1, self.spec.num_seeds)
        self.abs_sum = np.zeros(self.spec.num_seeds)
        self.counts = np.zeros(self.spec.num_seeds)

    def probabilities(self) -> np.ndarray | None:
        """Pro's sampling probabilities (None for plain FedKSeed: uniform)."""
        return pro_probabilities(self.abs_sum, self.counts) if self.config.pro else None

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, ZoPlan]:
        """Each client gets the coefficient changes since its last sync (and Pro's p)."""
        probs = self.probabilities()
        plans = {
            c.client_id: ZoPlan(
                self.spec, self.state.sync_for(c.client_id, self.spec.sync == "full"), probs
            )
            for c in clients
        }
        for c in clients:  # unknown until the client confirms (a failed client gets a dense sync)
            self.state.client_versions.pop(c.client_id, None)
        return plans

    def _clip(self, g: np.ndarray) -> np.ndarray:
        c = self.config.scalar_clip
        return np.clip(g, -c, c) if c > 0 else g

    def aggregate_train(self, server_round: int, updates: Sequence[ZoUpdate]) -> AggregateResult:
        """Accumulate ``lr * p_i * clip(g)`` per seed; the new global is the new version."""
        if not updates:
            raise AggregationError("strategy 'fedkseed' got no updates to aggregate")
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        total = sum(u.header.num_examples for u in ordered)
        delta = np.zeros((1, self.spec.num_seeds))
        mean = folded_mean(ordered, 1, self.spec.num_seeds)  # the replies' sum, when summed
        for u in ordered if mean is None else ():
            if len(u.blocks):
                raise AggregationError(
                    f"client {u.header.client_id} sent block indices; fedkseed has one block"
                )
            p = u.header.num_examples / total if self.config.weighted else 1 / len(ordered)
            g = self._clip(u.scalars.astype(np.float64))
            np.add.at(delta[0], u.seeds.astype(np.int64), self.spec.lr * p * g)
            np.add.at(self.abs_sum, u.seeds.astype(np.int64), np.abs(g))
            np.add.at(self.counts, u.seeds.astype(np.int64), 1)
        if mean is not None:  # each scalar was clipped as it was summed (capabilities)
            delta = self.spec.lr * mean
        changed = self.state.commit(delta, server_round)
        for u in ordered:
            self.state.client_versions[u.header.client_id] = u.synced_version
        return AggregateResult(
            zo=ZoGlobal(self.spec, server_round, self.state.published),
            metrics={"zo_changed_seeds": float(changed)},
        )

    def state_dict(self) -> dict[str, Any]:
        """Coefficients, versions and Pro's statistics."""
        return {
            "coeffs": self.state.state_dict(),
            "abs_sum": self.abs_sum.copy(),
            "counts": self.counts.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.state.load_state_dict(state["coeffs"])
        self.abs_sum = np.array(state["abs_sum"], np.float64)
        self.counts = np.array(state["counts"], np.float64)


class FedKSeedPro:
    """FedKSeed-Pro: FedKSeed with importance-weighted seed sampling."""

    zo_algorithm = "fedkseed"
    trainer = ZoTrainer()  # the shared seed/scalar client loop, unmasked
    capabilities = staticmethod(
        weighted_linear("zo", client_statistics=True, codecs=frozenset({"none"}))
    )

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedKSeedPro` (as FedKSeed's, with sampling always on)."""

        weighted: bool = True
        scalar_clip: float = 100.0

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.inner = FedKSeed(FedKSeed.Config(True, config.weighted, config.scalar_clip), ctx)

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, ZoPlan]:
        """See :meth:`FedKSeed.configure_train`."""
        return self.inner.configure_train(server_round, clients)

    def aggregate_train(self, server_round: int, updates: Sequence[ZoUpdate]) -> AggregateResult:
        """See :meth:`FedKSeed.aggregate_train`."""
        return self.inner.aggregate_train(server_round, updates)

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`FedKSeed.state_dict`."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """See :meth:`FedKSeed.load_state_dict`."""
        self.inner.load_state_dict(state)


register_strategy("fedkseed", FedKSeed)
register_strategy("fedkseed-pro", FedKSeedPro)
