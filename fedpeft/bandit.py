"""Online bandits that pick an arm per device: a pooled model-based UCB, sliding-window /
discounted UCB, epsilon-greedy, Thompson sampling, behind one small protocol.

FedSpine (2025) picks each device's (structured pruning ratio, LoRA rank) arm with a bandit
that learns, without prior knowledge of the device, which arm makes the most progress per
second. One object serves a whole federation: ``PooledUCB`` shares what devices learn about
an arm's quality and keeps their speed apart; the others keep independent statistics per
device id. Rewards are whatever the caller measures (see :mod:`fedpeft.algorithms.fedspine`
for the reward used there). Randomness (tie breaks, exploration, posterior draws) comes from a
generator seeded by ``(seed, "bandit", device, t)``, so ``state_dict`` holds only counts and
sums and a resumed bandit makes the same choices.

- ``SlidingWindowUCB`` (Garivier & Moulines 2011): UCB1 over the last ``window`` pulls of the
  device, for rewards that drift (a device's speed changes with load).
- ``DiscountedUCB`` (same paper): statistics decay by ``gamma`` every pull.
- ``EpsilonGreedy``: the best mean with probability ``1 - epsilon``, else a uniform arm.
- ``ThompsonSampling``: Gaussian posterior per arm (unit prior, noise from the observed
  spread), the arm with the largest draw.
- ``PooledUCB``: one model for the whole federation. An arm's quality (its scale-free gain)
  is mostly a property of the arm, so it is pooled over every device's pulls of the arm, with
  a UCB bonus from the pooled count; a device's speed is its own, so its slowness on an arm
  (device time over the round's median) comes from its own recent pulls of the arm, or,
  for an arm it has not played, from a log-additive fit ``log slowness = device + arm`` over
  every pull (how slow this device is, times how slow the arm is everywhere). The score is
  the reward the pull is expected to earn (:class:`Outcome`). Arms nobody has played are
  played first, spread over the devices of a round, so exploration costs one round, not one
  per arm per device.
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
    "Outcome",
    "OutcomeBandit",
    "PinnedArms",
    "PooledUCB",
    "SlidingWindowUCB",
    "ThompsonSampling",
    "make_bandit",
]


@dataclass(frozen=True, order=True)
class Arm:
    """One choice: structured pruning ratio and LoRA rank."""

    ratio: float
    rank: int


@dataclass(frozen=True)
class Outcome:
    """What one pull measured, in the parts FedSpine's reward combines.

    Attributes
    ----------
    gain : float
        Scale-free quality: the device's gain over the round's median absolute gain.
    slowness : float
        The device's time over the round's median device time (> 0).
    weight : float
        The charge per unit of delay (``delay_penalty`` x devices in the round).
    failed : bool
        The update did not come back (deadline, memory, gone): a property of the device on
        that arm, not of the arm's quality.
    """

    gain: float
    slowness: float
    weight: float
    failed: bool = False

    @property
    def reward(self) -> float:
        """``gain - weight * max(0, slowness - 1)``."""
        return self.gain - self.weight * max(0.0, self.slowness - 1.0)


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


@runtime_checkable
class OutcomeBandit(Bandit, Protocol):
    """A bandit that learns from the parts of a reward (FedSpine calls ``observe`` when the
    bandit has it, else ``update`` with ``outcome.reward``)."""

    def observe(self, device: str, arm: int, outcome: Outcome) -> None:
        """Record what ``device`` measured with ``arm``."""
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
class PooledUCB(_Base):
    """Arm quality pooled over devices, speed per device (see the module docstring).

    ``window``: pulls of an arm (over all devices) its quality is averaged over, and pulls of
    a device its own speed is read from; ``c``: exploration scale of the quality bonus.
    """

    window: int = 40
    c: float = 1.0
    # (device, arm, gain, slowness, weight, failed) of every pull, in order
    outcomes: list[tuple[str, int, float, float, float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.c < 0:
            raise ConfigError(f"pooled-ucb needs window >= 1 and c >= 0, got {self.window}, "
                              f"{self.c}")  # fmt: skip

    def observe(self, device: str, arm: int, outcome: Outcome) -> None:
        """Record the pull's reward and its parts."""
        if not (outcome.slowness > 0 and math.isfinite(outcome.slowness)):
            raise ValueError(f"slowness must be finite and > 0, got {outcome.slowness}")
        if not (math.isfinite(outcome.gain) and math.isfinite(outcome.weight)):
            raise ValueError(f"outcome must be finite, got {outcome}")
        super().update(device, arm, outcome.reward)
        o = outcome
        self.outcomes.append((device, int(arm), o.gain, o.slowness, o.weight, bool(o.failed)))

    def update(self, device: str, arm: int, reward: float) -> None:
        """A bare reward: all quality, on time."""
        self.observe(device, arm, Outcome(gain=reward, slowness=1.0, weight=0.0))

    def state_dict(self) -> dict[str, Any]:
        """Pull history and the outcomes behind it."""
        return {**super().state_dict(), "outcomes": [list(o) for o in self.outcomes]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.outcomes = [
            (str(d), int(a), float(g), float(s), float(w), bool(f))
            for d, a, g, s, w, f in state["outcomes"]
        ]

    def quality(self) -> tuple[np.ndarray, np.ndarray]:
        """Per arm: mean gain over its last ``window`` pulls on any device that came back,
        and their count."""
        k = len(self.arms)
        gains: list[list[float]] = [[] for _ in range(k)]
        for _, a, g, _, _, failed in self.outcomes:
            if not failed:
                gains[a].append(g)
        recent = [x[-self.window :] for x in gains]
        n = np.array([len(x) for x in recent], dtype=np.float64)
        mean = np.array([sum(x) / len(x) if x else 0.0 for x in recent])
        return mean, n

    def slowness(self, device: str) -> np.ndarray:
        """Predicted slowness of ``device`` on every arm: the mean (in log) of its own last
        pulls of the arm within its last ``window`` (a failed pull counts as it was charged),
        else ``exp(device + arm)`` from a log-additive fit over every pull that came back (a
        device nobody has seen is typical: 0)."""
        k = len(self.arms)
        logs = [(d, a, math.log(s)) for d, a, _, s, _, failed in self.outcomes if not failed]
        dev: dict[str, float] = {}
        arm = np.zeros(k)
        for _ in range(20):  # alternating means: converges fast for this two-way layout
            res: list[list[float]] = [[] for _ in range(k)]
            for d, a, y in logs:
                res[a].append(y - dev.get(d, 0.0))
            arm = np.array([sum(r) / len(r) if r else 0.0 for r in res])
            per: dict[str, list[float]] = {}
            for d, a, y in logs:
                per.setdefault(d, []).append(y - arm[a])
            dev = {d: sum(r) / len(r) for d, r in per.items()}
        pred = np.exp(dev.get(device, 0.0) + arm)
        own: list[list[float]] = [[] for _ in range(k)]
        mine = [(a, math.log(s)) for d, a, _, s, _, _ in self.outcomes if d == device]
        for a, y in mine[-self.window :]:
            own[a].append(y)
        for a, ys in enumerate(own):
            if ys:
                pred[a] = math.exp(sum(ys) / len(ys))
        return pred

    def select(self, device: str, allowed: Sequence[int]) -> int:
        """The arm of largest expected reward (pooled quality + bonus, minus the device's
        predicted delay charge); arms nobody has played first."""
        ok = self._allowed(allowed)
        pulled = {o[1] for o in self.outcomes}
        fresh = [i for i in ok if i not in pulled]
        if fresh:
            return int(self._rng(device).choice(fresh))
        mean, n = self.quality()
        total = max(float(n.sum()), 2.0)
        bonus = self.c * np.sqrt(2 * math.log(total) / np.maximum(n, 1))
        weight = self.outcomes[-1][4] if self.outcomes else 0.0
        delay = weight * np.maximum(0.0, self.slowness(device) - 1.0)
        return self._argmax(device, mean + bonus - delay, allowed)


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
    """A bandit by name: ``pooled-ucb``, ``sw-ucb``, ``d-ucb``, ``epsilon-greedy``, ``thompson``
    or ``pinned`` (whose options are ``device id = arm index``), or an out-of-tree
    :class:`Bandit` class named ``path/to/file.py:Class`` or ``package.module:Class``, built as
    ``Class(arms=..., seed=..., **options)``.

    Raises
    ------
    ConfigError
        For an unknown name or option.
    """
    classes: dict[str, type[_Base]] = {
        "pooled-ucb": PooledUCB,
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
