"""Client-level differential privacy around a strategy (``[dp]``): clip, average, add noise.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018) with the noise added at the coordinator. Per round, with ``k`` the clients per
round, ``C`` = ``dp.clip_norm`` and ``z`` = ``dp.noise_multiplier``:

- LoRA: each client's change to the factors it trains (``parts``; FFA-LoRA trains only ``B``,
  the natural pair: its aggregate is exact and the frozen ``A`` gets no noise; Sun et al.,
  ICLR 2024) is scaled to norm at most ``C``; the release is ``sum_k clip(d_k) / k + N(0,
  (z C / k)^2)`` on every trained coordinate, and the strategy aggregates that one update
  (all clients must have been sent the same factors: FedAvg, FFA-LoRA).
- Seed/scalar (FedKSeed, Ferret): a client's upload is a vector over the (block, seed)
  directions (its scalars summed per direction); it is scaled to norm at most ``C``; every
  client gets the same weight ``1 / k``; and one more set of pairs carrying ``N(0, (z C /
  k)^2)`` on every direction of the pool is added, so the strategy's per-direction sum is the
  noisy clipped mean. The directions themselves are public (the shared pool).

With a linear strategy the coordinator does the clipping and the sum itself, one reply at a
time (:mod:`fedpeft.server.fold`, streaming or batch): the wrapper then gets the clipped mean
(one combined LoRA update, or seed/scalar stubs with the mean on one) and adds only the noise,
the same draw on the same coordinates.

Dividing by ``k`` (not by the valid updates that came back) keeps the sensitivity at
``C / k`` when clients drop. Epsilon at ``dp.delta`` is reported in every round's metrics
(``dp_epsilon``) by :class:`~fedpeft.privacy.PrivacyAccountant`, whose state is part of this
wrapper's, and a round that would pass ``dp.max_epsilon`` is not started
(:class:`~fedpeft.privacy.PrivacyBudgetExhausted`). Noise comes from a generator seeded by
``(run seed, "dp-noise", round)`` (reproducible, so resume is exact), or from ``os.urandom``
with ``dp.secure_noise``. Floating-point Gaussian sampling is known to leak through its
low-order bits (Mironov, CCS 2012); that attack is not addressed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import AggregateResult, Strategy
from fedpeft.changes import (
    FoldedZo,
    carrying_mean,
    clients_behind,
    combined_update,
    direction_sums,
    flat_change,
    sent_factors,
    shared_sent,
    summed_round,
    trained_mask,
    with_every_direction,
)
from fedpeft.config import DpConfig
from fedpeft.errors import AggregationError
from fedpeft.privacy import PrivacyAccountant, gaussian
from fedpeft.wire.messages import Adapter, ClientInfo, LoraUpdate
from fedpeft.wire.zo import ZoUpdate

__all__ = ["DpAggregation"]


class DpAggregation:
    """A strategy whose releases are client-level DP (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The strategy that aggregates the privatized release.
    config : DpConfig
        The ``[dp]`` section.
    clients_per_round : int
        ``k``: the fixed denominator of the mean.
    num_clients : int
        All clients (for the sampling rate).
    seed : int
        The run seed (noise generator).
    zo : bool
        Whether ``inner`` is a seed/scalar strategy.
    zo_shape : tuple[int, int]
        Seed/scalar strategies: ``(blocks, K)``.
    distributed : bool
        Secure aggregation is on: every client clipped its own contribution and added
        ``N(0, (z C)^2 / min_clients)`` before the secure sum, so the sum of at least
        ``min_clients`` contributions carries at least ``N(0, (z C)^2)``; this wrapper only
        accounts (and stops at the budget).
    """

    def __init__(
        self,
        inner: Strategy,
        config: DpConfig,
        clients_per_round: int,
        num_clients: int,
        seed: int,
        zo: bool = False,
        zo_shape: tuple[int, int] = (1, 1),
        distributed: bool = False,
    ) -> None:
        self.inner = inner
        self.config = config
        self.k = clients_per_round
        self.seed = seed
        self.zo = zo
        self.zo_shape = zo_shape
        self.distributed = distributed
        self.accountant = PrivacyAccountant(config, clients_per_round / num_clients)
        self._sent: dict[str, tuple[Adapter, str]] = {}

    @property
    def std(self) -> float:
        """Noise std on the mean: ``z * C / k``."""
        return self.config.noise_multiplier * self.config.clip_norm / self.k

    def configure_train(self, server_round: int, clients: Sequence[ClientInfo]) -> Any:
        """The inner plans, unless the round would pass the privacy budget."""
        self.accountant.check_next()
        plans = self.inner.configure_train(server_round, clients)
        self._sent = sent_factors(plans)
        return plans

    def aggregate_train(self, server_round: int, updates: Sequence[Any]) -> AggregateResult:
        """Privatize ``updates`` into one release; the inner strategy aggregates it."""
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        if not ordered:
            raise AggregationError("dp aggregation got no updates")
        if self.distributed:  # clipped and noised by the clients, summed securely
            release = ordered
        elif summed_round(ordered, self.zo):  # clipped and summed as they came: the noise only
            release = self._noised(server_round, ordered)
        elif self.zo:
            release = self._zo(server_round, ordered)
        else:
            release = self._lora(server_round, ordered)
        result = self.inner.aggregate_train(server_round, release)
        eps = self.accountant.step()
        metrics = {"dp_epsilon": eps, "dp_delta": self.config.delta, "dp_noise_std": self.std}
        return replace(result, metrics={**result.metrics, **metrics})

    def _noise(self, server_round: int, n: int) -> np.ndarray:
        return gaussian(n, self.std, self.seed, server_round, self.config.secure_noise)

    def _noised(self, server_round: int, updates: list[Any]) -> list[Any]:
        """The folded clipped mean ``sum_k clip(d_k) / k`` plus the same noise the unfolded
        path adds (same seed, same coordinates)."""
        if not self.zo:
            one = updates[0]
            sent, parts = self._sent[one.header.client_id]
            mask = trained_mask(sent, parts)
            # the mean as the combined factors carry it (float32 sent + mean, read back in
            # float64: off the float64 mean by at most half a float32 unit of the factors)
            change = flat_change(one.factors, sent) * mask
            change[mask] += torch.from_numpy(self._noise(server_round, int(mask.sum())))
            return [combined_update(one, sent, change, one.header.num_examples, one.clients)]
        blocks, num_seeds = self.zo_shape
        at = next(i for i, u in enumerate(updates) if isinstance(u, FoldedZo))
        mean = updates[at].mean.reshape(-1) + self._noise(server_round, blocks * num_seeds)
        out = list(updates)
        out[at] = carrying_mean(out[at], mean, len(out), blocks, num_seeds)  # the noisy mean
        return out

    def _lora(self, server_round: int, updates: list[LoraUpdate]) -> list[LoraUpdate]:
        first = updates[0]
        sent = shared_sent(
            {c: a for c, (a, _) in self._sent.items()},
            [u.header.client_id for u in updates],
            "dp averages updates of clients that were all sent the same factors; this strategy "
            "sends different ones (use fedavg or ffa)",
        )
        parts = self._sent[first.header.client_id][1]
        mask = trained_mask(sent, parts)  # (d,) the trained coordinates
        total = torch.zeros(mask.shape, dtype=torch.float64)
        for u in updates:
            d = flat_change(u.factors, sent) * mask  # (d,)
            total += d * min(1.0, self.config.clip_norm / max(float(d.norm()), 1e-300))
        noise = gaussian(
            int(mask.sum()), self.std, self.seed, server_round, self.config.secure_noise
        )
        release = total / self.k
        release[mask] += torch.from_numpy(noise)
        examples = sum(u.header.num_examples for u in updates)
        return [combined_update(first, sent, release, examples, clients_behind(updates))]

    def _zo(self, server_round: int, updates: list[ZoUpdate]) -> list[ZoUpdate]:
        blocks, num_seeds = self.zo_shape
        m, out = len(updates), []
        for u in updates:
            g = u.scalars.astype(np.float64)
            dense = direction_sums(u, blocks, num_seeds)  # (blocks * K,)
            scale = min(1.0, self.config.clip_norm / max(float(np.linalg.norm(dense)), 1e-300))
            # the strategy weights each update 1/m; (m / k) makes that 1/k
            out.append(
                replace(
                    u,
                    scalars=(g * scale * m / self.k).astype(np.float32),
                    header=replace(u.header, num_examples=1),
                )
            )
        noise = gaussian(
            blocks * num_seeds, self.std, self.seed, server_round, self.config.secure_noise
        )
        out[0] = with_every_direction(out[0], noise * m, blocks, num_seeds)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state and the accountant's."""
        return {"inner": self.inner.state_dict(), "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state["inner"])
        self.accountant.load_state_dict(state["accountant"])
