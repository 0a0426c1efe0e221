"""Rank policies: uniform, map, tiers, a user's policy object, and per-client caps."""

from __future__ import annotations

import pytest

from fedpeft.config.load import load_config
from fedpeft.errors import ConfigError
from fedpeft.lora.ranks import RankPolicy, make_rank_policy
from fedpeft.wire.messages import ClientInfo, Header


def _clients(n=4, caps=None):
    caps = caps or {}
    return [
        ClientInfo(Header("r", 0, "fp", "", 10, str(i)), "cpu", properties=caps.get(str(i), {}))
        for i in range(n)
    ]


def _policy(*overrides):
    cfg = load_config(None, ["federation.num_clients=4", "strategy.name=flora", *overrides])
    return make_rank_policy(cfg)


def test_uniform_map_and_tiers():
    assert set(_policy("lora.rank=6").assign(1, _clients()).values()) == {6}
    mapped = _policy("lora.rank=4", "ranks.mode=map", 'ranks.map={"2"=16}')
    assert mapped.assign(1, _clients()) == {"0": 4, "1": 4, "2": 16, "3": 4}
    assert mapped.max_rank == 16
    tiers = _policy("ranks.mode=tiers", "ranks.tiers=[2,8]")
    assert tiers.assign(3, _clients()[1:3]) == {"1": 8, "2": 2}  # by position, not by sample


def test_a_client_cap_wins():
    tiers = _policy("ranks.mode=tiers", "ranks.tiers=[16]")
    assert tiers.assign(1, _clients(2, {"1": {"max_rank": 4.0}})) == {"0": 16, "1": 4}


def test_policy_object_is_loaded_and_checked(tmp_path):
    (tmp_path / "pol.py").write_text(
        "class Alternate:\n"
        "    def __init__(self, max_rank, seed):\n"
        "        self.max_rank = max_rank\n"
        "    def assign(self, server_round, clients):\n"
        "        r = self.max_rank if server_round % 2 else 1\n"
        "        return {c.client_id: r for c in clients}\n"
        "class Broken:\n"
        "    def __init__(self, max_rank, seed):\n"
        "        pass\n"
    )
    pol = _policy("ranks.mode=policy", f"ranks.policy={tmp_path / 'pol.py'}:Alternate")
    assert isinstance(pol, RankPolicy)
    assert set(pol.assign(1, _clients()).values()) == {16}
    assert set(pol.assign(2, _clients()).values()) == {1}
    with pytest.raises(ConfigError, match="without `assign"):
        _policy("ranks.mode=policy", f"ranks.policy={tmp_path / 'pol.py'}:Broken")
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        _policy("ranks.mode=policy", f"ranks.policy={tmp_path / 'pol.py'}:Nope")
