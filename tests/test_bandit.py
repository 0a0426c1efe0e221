"""Bandits: seeded convergence to the best arm, per-device independence, exact resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedpeft.bandit import Arm, Bandit, make_bandit
from fedpeft.errors import ConfigError

ARMS = [Arm(r, k) for r in (0.0, 0.25, 0.5) for k in (4, 8)]
MEANS = np.array([0.2, 0.35, 0.5, 0.9, 0.4, 0.1])  # arm 3 is best
KINDS = {
    "pooled-ucb": {"window": 100, "c": 0.3},
    "sw-ucb": {"window": 100, "c": 0.3},  # c near the reward noise (0.2)
    "d-ucb": {"gamma": 0.99, "c": 0.3},
    "epsilon-greedy": {"epsilon": 0.1},
    "thompson": {},
}


def _play(
    bandit: Bandit, device: str, rounds: int, seed: int, means=MEANS, allowed=None
) -> list[int]:
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(rounds):
        arm = bandit.select(device, range(len(ARMS)) if allowed is None else allowed)
        bandit.update(device, arm, float(means[arm] + rng.normal(0, 0.2)))
        picks.append(arm)
    return picks


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_converges_to_the_best_arm(kind):
    bandit = make_bandit(kind, ARMS, seed=0, **KINDS[kind])
    picks = _play(bandit, "dev", 300, seed=1)
    share = np.mean(np.array(picks[-100:]) == 3)
    assert share >= 0.8, (kind, share)


@pytest.mark.parametrize("kind", ["sw-ucb", "d-ucb"])
def test_windowed_ucb_follows_a_device_that_changes(kind):
    bandit = make_bandit(kind, ARMS, seed=0, **KINDS[kind])
    _play(bandit, "dev", 200, seed=1)
    shifted = MEANS.copy()
    shifted[0], shifted[3] = 1.0, 0.2  # the device got faster at arm 0, slower at arm 3
    picks = _play(bandit, "dev", 300, seed=2, means=shifted)
    assert np.mean(np.array(picks[-100:]) == 0) >= 0.7


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_round_trip_continues_identically(kind):
    a = make_bandit(kind, ARMS, seed=3, **KINDS[kind])
    _play(a, "x", 40, seed=2)
    _play(a, "y", 10, seed=5)
    b = make_bandit(kind, ARMS, seed=3, **KINDS[kind])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert _play(a, "x", 30, seed=9) == _play(b, "x", 30, seed=9)


def test_devices_learn_independently():
    """A new device explores every arm once, whatever another device learned (arm 3), and its
    plays leave the other device's choices unchanged."""
    bandit = make_bandit("sw-ucb", ARMS, seed=0, **KINDS["sw-ucb"])
    alone = make_bandit("sw-ucb", ARMS, seed=0, **KINDS["sw-ucb"])
    late = _play(bandit, "fast", 200, seed=1)[-50:]
    assert late.count(3) > 25  # it learned the best arm
    _play(alone, "fast", 200, seed=1)
    assert "slow" not in bandit.state_dict()["history"]
    assert sorted(_play(bandit, "slow", len(ARMS), seed=2, means=np.zeros(6))) == [0, 1, 2, 3, 4, 5]
    assert _play(bandit, "fast", 20, seed=3) == _play(alone, "fast", 20, seed=3)


def test_bad_input_is_rejected():
    with pytest.raises(ConfigError, match="unknown bandit"):
        make_bandit("nope", ARMS, seed=0)
    with pytest.raises(ConfigError, match="at least one arm"):
        make_bandit("thompson", [], seed=0)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_bandit("thompson", ARMS, seed=0, window=3)
    bandit = make_bandit("thompson", ARMS, seed=0)
    with pytest.raises(ValueError, match="finite"):
        bandit.update("d", 0, float("nan"))
    with pytest.raises(ValueError, match="outside"):
        bandit.update("d", 99, 1.0)


def test_pinned_arms_play_the_pinned_arm_and_refuse_bad_pins():
    arms = [Arm(0.0, 8), Arm(0.75, 4)]
    bandit = make_bandit("pinned", arms, 0, **{"3": 1.0})
    assert [bandit.select(d, [0, 1]) for d in ("3", "0", "3")] == [1, 0, 1]
    assert bandit.select("3", [0]) == 0  # its pin does not fit: the first arm that does
    bandit.update("3", 1, 0.5)
    assert bandit.state_dict()["history"]["3"] == [[1, 0.5]]
    with pytest.raises(ConfigError, match="outside"):
        make_bandit("pinned", arms, 0, **{"3": 2.0})
    with pytest.raises(ConfigError, match="arm index"):
        make_bandit("pinned", arms, 0, **{"3": 0.5})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_device_plays_only_the_arms_it_is_allowed(kind):
    """Arm 3 (the best) does not fit the device: it is never played, and the bandit converges
    to the best of the rest (arm 5 here); allowed again, arm 3 is explored and learned."""
    bandit = make_bandit(kind, ARMS, seed=0, **KINDS[kind])
    means = MEANS.copy()
    means[5] = 0.85  # the best allowed arm, 0.35 ahead of the next
    picks = _play(bandit, "dev", 300, seed=1, means=means, allowed=[0, 1, 2, 4, 5])
    assert 3 not in picks
    assert np.mean(np.array(picks[-100:]) == 5) >= 0.8, (kind, picks[-100:])
    later = _play(bandit, "dev", 300, seed=2)
    assert np.mean(np.array(later[-100:]) == 3) >= 0.8, (kind, later[-100:])
    with pytest.raises(ValueError, match="non-empty subset"):
        bandit.select("dev", [])


def test_a_plugin_bandit_without_allowed_is_refused(tmp_path):
    plugin = tmp_path / "old_bandit.py"
    plugin.write_text(
        "class Old:\n"
        "    def __init__(self, arms, seed): self.arms = arms\n"
        "    def select(self, device): return 0\n"
        "    def update(self, device, arm, reward): pass\n"
        "    def state_dict(self): return {}\n"
        "    def load_state_dict(self, state): pass\n"
    )
    with pytest.raises(ConfigError, match=r"select must take \(device, allowed\)"):
        make_bandit(f"{plugin}:Old", ARMS, seed=0)


def test_pooled_ucb_shares_arm_quality_so_a_new_device_plays_the_best_arm_at_once():
    """Ten devices learn that arm 3 is best; an eleventh, never seen, plays it on its first
    pull. A per-device bandit would first play every arm on it."""
    pooled = make_bandit("pooled-ucb", ARMS, seed=0, c=0.3)
    rng = np.random.default_rng(1)
    for _ in range(30):
        for d in range(10):
            arm = pooled.select(str(d), range(len(ARMS)))
            pooled.update(str(d), arm, float(MEANS[arm] + rng.normal(0, 0.2)))
    assert pooled.select("new", range(len(ARMS))) == 3
    alone = make_bandit("sw-ucb", ARMS, seed=0, **KINDS["sw-ucb"])
    assert sorted(_play(alone, "new", len(ARMS), seed=2)) == list(range(len(ARMS)))


def test_pooled_ucb_first_round_spreads_the_arms_over_the_devices():
    pooled = make_bandit("pooled-ucb", ARMS, seed=0)
    picks = {pooled.select(str(d), range(len(ARMS))) for d in range(24)}
    assert len(picks) >= 5  # (seeded draws of 24 devices over 6 fresh arms)


def test_pooled_ucb_predicts_a_devices_slowness_on_an_arm_it_never_played():
    """Log-additive speed: arm 1 takes half of arm 0's time on every device seen; 'slow' is 3x
    typical on arm 0 and never played arm 1: predicted 1.5 there. With a delay charge it plays
    arm 1, while fast devices keep the better arm 0."""
    from fedpeft.bandit import Outcome

    arms = [Arm(0.0, 8), Arm(0.5, 8)]
    b = make_bandit("pooled-ucb", arms, seed=0, c=0.0)
    for d in ("f1", "f2", "f3"):
        b.observe(d, 0, Outcome(gain=1.0, slowness=1.0, weight=2.0))
        b.observe(d, 1, Outcome(gain=0.6, slowness=0.5, weight=2.0))
    b.observe("slow", 0, Outcome(gain=1.0, slowness=3.0, weight=2.0))
    np.testing.assert_allclose(b.slowness("slow"), [3.0, 1.5], rtol=1e-9)
    np.testing.assert_allclose(b.slowness("f1"), [1.0, 0.5], rtol=1e-9)
    # slow: arm 0 earns 1 - 2 x 2 = -3, arm 1 0.6 - 2 x 0.5 = -0.4; fast: 1 vs 0.6
    assert b.select("slow", [0, 1]) == 1
    assert b.select("f1", [0, 1]) == 0
    assert b.select("slow", [0]) == 0  # only what is allowed


def test_pooled_ucb_resumes_exactly():
    import json

    from fedpeft.bandit import Outcome

    a = make_bandit("pooled-ucb", ARMS, seed=5, c=0.5)
    rng = np.random.default_rng(0)

    def step(bandit, rng_state):
        r = np.random.default_rng(rng_state)
        out = []
        for d in ("a", "b", "c"):
            arm = bandit.select(d, range(len(ARMS)))
            bandit.observe(d, arm, Outcome(float(MEANS[arm] + r.normal(0, 0.2)),
                                           float(r.uniform(0.5, 2.0)), 1.5))  # fmt: skip
            out.append(arm)
        return out

    for _ in range(8):
        step(a, int(rng.integers(1 << 30)))
    b = make_bandit("pooled-ucb", ARMS, seed=5, c=0.5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    seeds = [int(rng.integers(1 << 30)) for _ in range(6)]
    assert [step(a, s) for s in seeds] == [step(b, s) for s in seeds]
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="slowness"):
        a.observe("a", 0, Outcome(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="window"):
        make_bandit("pooled-ucb", ARMS, seed=0, window=0)


def test_pooled_ucb_keeps_a_failed_pull_with_the_device_not_the_arm():
    """A device that ran out of memory on arm 0 is charged there (its own slowness 2); the arm's
    pooled quality, and what the other devices expect of it, do not change."""
    from fedpeft.bandit import Outcome

    arms = [Arm(0.0, 8), Arm(0.5, 8)]
    b = make_bandit("pooled-ucb", arms, seed=0, c=0.0)
    for d in ("f1", "f2"):
        b.observe(d, 0, Outcome(gain=1.0, slowness=1.0, weight=2.0))
        b.observe(d, 1, Outcome(gain=0.6, slowness=1.0, weight=2.0))
    before = (b.quality()[0].copy(), b.slowness("f1").copy())
    b.observe("weak", 0, Outcome(gain=0.0, slowness=2.0, weight=2.0, failed=True))
    np.testing.assert_array_equal(b.quality()[0], before[0])
    np.testing.assert_array_equal(b.slowness("f1"), before[1])
    assert b.slowness("weak")[0] == pytest.approx(2.0)
    assert b.select("weak", [0, 1]) == 1 and b.select("f1", [0, 1]) == 0
