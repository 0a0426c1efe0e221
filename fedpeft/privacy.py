"""Privacy accounting for client-level DP, on Google's ``dp-accounting`` library.

Each round releases the clients' mean clipped change plus Gaussian noise of std
``z * C / k`` (``k``: clients per round), a Gaussian mechanism with noise multiplier ``z``
on the add/remove-one-client relation (DP-FedAvg: McMahan et al., ICLR 2018). ``T`` rounds
compose; with ``amplification = "poisson"`` each round is credited as Poisson sampling at
rate ``q = k / n`` (fedpeft samples exactly ``k`` clients, so this is the usual
approximation, not a proof). The PLD accountant is tight (for ``T`` unsampled rounds it gives
the exact epsilon of ``sqrt(T) / z``-GDP); the RDP accountant is an upper bound, reported
instead of PLD's value when it exceeds ``PLD_MAX_EPSILON`` (64) or PLD cannot be computed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.config import DpConfig
from fedpeft.errors import FedpeftError
from fedpeft.seeding import np_rng

__all__ = ["PrivacyAccountant", "PrivacyBudgetExhausted", "clip_and_noise", "gaussian"]


# The PLD accountant discretises the privacy loss on a grid whose size grows with epsilon:
# at noise multiplier 0.05 (epsilon ~750) it takes ~30 s, at 0.01 it exhausts 23 GiB. Where
# RDP's upper bound is already above this (no meaningful guarantee left), it is reported as is.
PLD_MAX_EPSILON = 64.0


class PrivacyBudgetExhausted(FedpeftError):
    """The next round would spend more privacy than ``dp.max_epsilon`` allows."""


class PrivacyAccountant:
    """Epsilon spent after some rounds of the Gaussian mechanism.

    Parameters
    ----------
    config : DpConfig
        Noise multiplier, delta, accountant kind and amplification.
    sample_rate : float
        Clients per round over all clients (used with ``amplification = "poisson"``).
    """

    def __init__(self, config: DpConfig, sample_rate: float = 1.0) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.rounds = 0

    def _event(self, rounds: int) -> Any:
        import dp_accounting

        event: Any = dp_accounting.GaussianDpEvent(self.config.noise_multiplier)
        if self.config.amplification == "poisson" and self.sample_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(self.sample_rate, event)
        return dp_accounting.SelfComposedDpEvent(event, rounds)

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``config.delta`` after ``rounds`` (default: the rounds so far)."""
        t = self.rounds if rounds is None else rounds
        if t == 0:
            return 0.0
        from dp_accounting.pld import PLDAccountant
        from dp_accounting.rdp import RdpAccountant

        rdp = self._epsilon(RdpAccountant, t)
        if self.config.accountant == "rdp" or rdp > PLD_MAX_EPSILON:
            return rdp
        pld = self._epsilon(PLDAccountant, t)  # tighter, where it can be computed
        return pld if math.isfinite(pld) else rdp

    def _epsilon(self, kind: Any, rounds: int) -> float:
        """Epsilon from one ``dp_accounting`` accountant (inf when it cannot say)."""
        try:
            acc: Any = kind()
            acc.compose(self._event(rounds))
            eps = float(acc.get_epsilon(self.config.delta))
        except (ValueError, OverflowError, MemoryError):
            return math.inf
        return eps if math.isfinite(eps) else math.inf

    def check_next(self) -> None:
        """Raise :class:`PrivacyBudgetExhausted` if one more round would pass the budget."""
        budget = self.config.max_epsilon
        if budget > 0:
            nxt = self.epsilon(self.rounds + 1)
            if nxt > budget:
                raise PrivacyBudgetExhausted(
                    f"round {self.rounds + 1} would reach epsilon {nxt:.4g} > dp.max_epsilon = "
                    f"{budget:g} (delta {self.config.delta:g}); stopping after {self.rounds} "
                    "rounds"
                )

    def step(self) -> float:
        """Count one released round; returns the epsilon spent so far."""
        self.rounds += 1
        return self.epsilon()

    def state_dict(self) -> dict[str, Any]:
        """Rounds released (the accountant's whole state)."""
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.rounds = int(state["rounds"])


def gaussian(n: int, std: float, seed: int, server_round: int, secure: bool) -> np.ndarray:
    """``n`` draws of ``N(0, std^2)`` (float64), seeded or from ``os.urandom``."""
    if secure:
        # Box-Muller on uniforms made from the OS's cryptographic random bytes
        u = np.frombuffer(os.urandom(16 * n), dtype="<u8").reshape(2, n)
        u1 = (u[0] >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # (0, 1)
        u2 = (u[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        out: np.ndarray = std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return out
    return np_rng(seed, "dp-noise", server_round).normal(0.0, std, n)


def clip_and_noise(
    vector: np.ndarray, clip: float, std: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """A client's DP contribution under secure aggregation: ``vector`` scaled to L2 norm at
    most ``clip``, plus ``N(0, std^2)`` from ``os.urandom`` on the coordinates in ``mask``
    (all when ``None``). The noise is the client's secret: the coordinator sees only sums."""
    v = np.asarray(vector, np.float64) * (mask if mask is not None else 1.0)
    v = v * min(1.0, clip / max(float(np.linalg.norm(v)), 1e-300))
    if std > 0:
        where = np.ones(v.shape, bool) if mask is None else mask.astype(bool)
        v[where] += gaussian(int(where.sum()), std, 0, 0, secure=True)
    return v
