"""Online bandits that pick an arm per device: sliding-window / discounted UCB, epsilon-greedy,
Thompson sampling, behind one small protocol.

FedSpine (2025) picks each device's (structured pruning ratio, LoRA rank) arm with a bandit
that learns, without prior knowledge of the device, which arm makes the most progress per
second. Every bandit here keeps independent statistics per device id, so one object serves a
whole federation; rewards are whatever the caller measures (see the FedSpine issue for the
reward used there). Randomness (tie breaks, exploration, posterior draws) comes from a
generator seeded by ``(seed, "bandit", device, t)``, so ``state_dict`` holds only counts and
sums and a resumed bandit makes the same choices.

- ``SlidingWindowUCB`` (Garivier & Moulines 2011): UCB1 over the last ``window`` pulls of the
  device, for rewards that drift (a device's speed changes with load).
- ``DiscountedUCB`` (same paper): statistics decay by ``gamma`` every pull.
- ``EpsilonGreedy``: the best mean with probability ``1 - epsilon``, else a uniform arm.
- ``ThompsonSampling``: Gaussian posterior per arm (unit prior, noise from the observed
  spread), the arm with the largest draw.
- ``PinnedArms``: no learning: each device plays the arm it is pinned to (arm 0 if none) -
  a known assignment, or an oracle baseline to compare a learner with.

Unplayed arms are played first (in a seeded random order). A device plays only the arms it is
allowed (``select(device, allowed)``: FedSpine leaves out the arms whose memory footprint
exceeds the device's budget); the statistics of the others are kept, not used.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedpeft.errors import ConfigError, StrategyError
from fedpeft.plugins import load_object
from fedpeft.seeding import np_rng

__all__ = [
    "Arm",
    "Bandit",
    "DiscountedUCB",
    "EpsilonGreedy",
    "PinnedArms",
    "SlidingWindowUCB",
    "ThompsonSampling",
    "make_bandit",
]


@dataclass(frozen=True, order=True)
class Arm:
    """One choice: structured pruning ratio and LoRA rank."""

    ratio: float
    rank: int


@runtime_checkable
class Bandit(Protocol):
    """Pick an arm per device and learn from the reward it earned."""

    arms: Sequence[Arm]

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """Index of the arm ``device`` plays next, one of ``allowed`` (not empty: the arms
        that fit the device, e.g. its memory budget)."""
        ...

    def update(self, device: str, arm: int, reward: float) -> None:
        """Record the reward ``device`` earned with ``arm``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@dataclass
class _Base:
    """Per-device pull history shared by the bandits: (arm, reward) in order."""

    arms: Sequence[Arm]
    seed: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("a bandit needs at least one arm")

    def _rng(self, device: str) -> np.random.Generator:
        return np_rng(self.seed, "bandit", device, len(self.history.get(device, [])))

    def _unplayed(self, device: str, allowed: Sequence[int]) -> list[int]:
        played = {a for a, _ in self.history.get(device, [])}
        return [i for i in self._allowed(allowed) if i not in played]

    def _allowed(self, allowed: Sequence[int]) -> list[int]:
        out = sorted({int(i) for i in allowed})
        if not out or not all(0 <= i < len(self.arms) for i in out):
            raise ValueError(f"allowed arms {list(allowed)} must be a non-empty subset of "
                             f"0..{len(self.arms) - 1}")  # fmt: skip
        return out

    def _first_unplayed(self, device: str, allowed: Sequence[int]) -> int | None:
        unplayed = self._unplayed(device, allowed)
        if not unplayed:
            return None
        return int(self._rng(device).choice(unplayed))

    def update(self, device: str, arm: int, reward: float) -> None:
        """Record a pull; rejects unknown arms and non-finite rewards."""
        if not 0 <= arm < len(self.arms):
            raise ValueError(f"arm {arm} is outside 0..{len(self.arms) - 1}")
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        self.history.setdefault(device, []).append((int(arm), float(reward)))

    def state_dict(self) -> dict[str, Any]:
        """The pull history of every device."""
        return {"history": {d: [list(p) for p in h] for d, h in self.history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the pull history."""
        self.history = {
            str(d): [(int(a), float(r)) for a, r in h] for d, h in state["history"].items()
        }

    def _argmax(self, device: str, scores: np.ndarray, allowed: Sequence[int]) -> int:
        masked = np.full(len(self.arms), -np.inf)
        idx = self._allowed(allowed)
        masked[idx] = scores[idx]
        best = np.flatnonzero(masked >= masked[idx].max() - 1e-12)
        return int(self._rng(device).choice(best))


def _stats(pulls: Sequence[tuple[int, float]], k: int, weights: np.ndarray) -> tuple[Any, Any]:
    n, s = np.zeros(k), np.zeros(k)
    for (arm, reward), w in zip(pulls, weights, strict=True):
        n[arm] += w
        s[arm] += w * reward
    return n, s


@dataclass
class SlidingWindowUCB(_Base):
    """UCB1 on the last ``window`` pulls of each device."""

    window: int = 20
    c: float = 1.0  # exploration scale (rewards are not in [0, 1] in general)

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """The arm with the largest mean + c sqrt(2 ln t / n) in the window."""
        first = self._first_unplayed(device, allowed)
        if first is not None:
            return first
        recent = self.history[device][-self.window :]
        n, s = _stats(recent, len(self.arms), np.ones(len(recent)))
        unseen = [i for i in self._allowed(allowed) if n[i] == 0]
        if unseen:  # fell out of the window: play it again
            return int(self._rng(device).choice(unseen))
        bonus = self.c * np.sqrt(2 * math.log(len(recent)) / np.maximum(n, 1))
        return self._argmax(device, s / np.maximum(n, 1) + bonus, allowed)


@dataclass
class DiscountedUCB(_Base):
    """UCB with statistics discounted by ``gamma`` per pull."""

    gamma: float = 0.95
    c: float = 1.0

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """The arm with the largest discounted mean + c sqrt(2 ln n_total / n)."""
        first = self._first_unplayed(device, allowed)
        if first is not None:
            return first
        pulls = self.history[device]
        w = self.gamma ** np.arange(len(pulls) - 1, -1, -1, dtype=np.float64)
        n, s = _stats(pulls, len(self.arms), w)
        n = np.maximum(n, 1e-12)
        bonus = self.c * np.sqrt(2 * math.log(max(n.sum(), 1.0 + 1e-9)) / n)
        return self._argmax(device, s / n + bonus, allowed)


@dataclass
class EpsilonGreedy(_Base):
    """The best mean reward with probability ``1 - epsilon``, else a uniform arm."""

    epsilon: float = 0.1

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """Explore or exploit."""
        first = self._first_unplayed(device, allowed)
        if first is not None:
            return first
        rng = self._rng(device)
        if rng.random() < self.epsilon:
            ok = self._allowed(allowed)
            if len(ok) == len(self.arms):  # (the draw every arm allowed has always made)
                return int(rng.integers(len(self.arms)))
            return int(rng.choice(ok))
        pulls = self.history[device]
        n, s = _stats(pulls, len(self.arms), np.ones(len(pulls)))
        return self._argmax(device, s / np.maximum(n, 1), allowed)


@dataclass
class ThompsonSampling(_Base):
    """Gaussian Thompson sampling: draw each arm's mean from its posterior, play the best."""

    prior_var: float = 1.0

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """The arm with the largest posterior draw."""
        first = self._first_unplayed(device, allowed)
        if first is not None:
            return first
        pulls = self.history[device]
        n, s = _stats(pulls, len(self.arms), np.ones(len(pulls)))
        rewards = np.array([r for _, r in pulls])
        noise = max(float(rewards.var()), 1e-12)  # pooled observation variance
        post_var = 1.0 / (1.0 / self.prior_var + n / noise)
        post_mean = post_var * (s / noise)
        draws = self._rng(device).normal(post_mean, np.sqrt(post_var))
        return self._argmax(device, draws, allowed)


@dataclass
class PinnedArms(_Base):
    """Every device plays its pinned arm (``pins``: device id -> arm index; others arm 0)."""

    pins: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = {d: i for d, i in self.pins.items() if not 0 <= i < len(self.arms)}
        if bad:
            raise ConfigError(f"pinned arms {bad} are outside 0..{len(self.arms) - 1}")

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """The device's pinned arm; if it is not allowed, the first allowed arm."""
        ok = self._allowed(allowed)
        pin = self.pins.get(device, 0)
        return pin if pin in ok else ok[0]


def make_bandit(kind: str, arms: Sequence[Arm], seed: int, **options: float) -> Bandit:
    """A bandit by name: ``sw-ucb``, ``d-ucb``, ``epsilon-greedy``, ``thompson`` or ``pinned``
    (whose options are ``device id = arm index``), or an out-of-tree :class:`Bandit` class
    named ``path/to/file.py:Class`` or ``package.module:Class``, built as
    ``Class(arms=..., seed=..., **options)``.

    Raises
    ------
    ConfigError
        For an unknown name or option.
    """
    classes: dict[str, type[_Base]] = {
        "sw-ucb": SlidingWindowUCB,
        "d-ucb": DiscountedUCB,
        "epsilon-greedy": EpsilonGreedy,
        "thompson": ThompsonSampling,
    }
    if kind == "pinned":
        bad = {d: v for d, v in options.items() if v != int(v)}
        if bad:
            raise ConfigError(f"pinned bandit options are device = arm index, got {bad}")
        pins = {str(d): int(v) for d, v in options.items()}
        return PinnedArms(arms=list(arms), seed=seed, pins=pins)
    if ":" in kind:  # an out-of-tree bandit: 'path/to/file.py:Class' or 'package.module:Class'
        try:
            cls: Any = load_object(kind, "bandit")
        except StrategyError as err:
            raise ConfigError(f"bandit {kind!r}: {err}") from None
    elif kind in classes:
        cls = classes[kind]
    else:
        known = ", ".join([*classes, "pinned"])
        raise ConfigError(
            f"unknown bandit {kind!r}; known: {known}, or 'path/to/file.py:Class' / "
            "'package.module:Class' of a Bandit"
        )
    try:
        bandit = cls(arms=list(arms), seed=seed, **options)
    except TypeError as err:
        raise ConfigError(f"bandit {kind!r}: {err}") from None
    if not isinstance(bandit, Bandit):
        raise ConfigError(f"bandit {kind!r} built a {type(bandit).__name__}, not a Bandit")
    if len(inspect.signature(bandit.select).parameters) != 2:
        raise ConfigError(
            f"bandit {kind!r}: select must take (device, allowed): the arms the device may play "
            "(those that fit its memory budget)"
        )
    return bandit
