"""Which LoRA rank each client trains: a small policy protocol and the configured policies.

``[ranks] mode`` picks one: ``uniform`` (everyone ``lora.rank``), ``map`` (client id ->
rank), ``tiers`` (round-robin over the clients in id order, e.g. ``[2, 4, 8, 16]``), or
``policy`` (a user's object, asked every round; the bandit of FedSpine plugs in here).
A client that advertises ``max_rank`` in its properties (node config) never gets more.
Heterogeneous-rank strategies call :meth:`RankPolicy.assign` in ``configure_train``; the
instruction carries the rank and the coordinator rejects an update of any other rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError, StrategyError
from fedpeft.plugins import load_object
from fedpeft.wire.messages import ClientInfo

__all__ = ["FixedRanks", "RankPolicy", "TierRanks", "make_rank_policy"]


@runtime_checkable
class RankPolicy(Protocol):
    """Assigns a LoRA rank to every sampled client, each round."""

    @property
    def max_rank(self) -> int:
        """No assignment exceeds it (strategies size their global adapter by it)."""
        ...

    def assign(self, server_round: int, clients: Sequence[ClientInfo]) -> Mapping[str, int]:
        """Rank per client id, for every client in ``clients``."""
        ...


def _capped(rank: int, client: ClientInfo) -> int:
    cap = client.properties.get("max_rank")
    return min(rank, int(cap)) if cap is not None and cap >= 1 else rank


@dataclass(frozen=True)
class FixedRanks:
    """A fixed rank per client id (``default`` for the others)."""

    default: int
    ranks: Mapping[str, int]

    @property
    def max_rank(self) -> int:
        """The largest rank any client can get."""
        return max([self.default, *self.ranks.values()])

    def assign(self, server_round: int, clients: Sequence[ClientInfo]) -> dict[str, int]:
        """Look each client up; cap by its advertised ``max_rank``."""
        return {c.client_id: _capped(self.ranks.get(c.client_id, self.default), c) for c in clients}


@dataclass(frozen=True)
class TierRanks:
    """The i-th of ``client_ids`` (sorted) trains ``tiers[i % len(tiers)]``."""

    tiers: tuple[int, ...]
    client_ids: tuple[str, ...]

    @property
    def max_rank(self) -> int:
        """The largest tier."""
        return max(self.tiers)

    def assign(self, server_round: int, clients: Sequence[ClientInfo]) -> dict[str, int]:
        """Tier by position in the full client list (stable whoever is sampled)."""
        index = {cid: i for i, cid in enumerate(self.client_ids)}
        out = {}
        for c in clients:
            i = index.get(c.client_id, len(index))
            out[c.client_id] = _capped(self.tiers[i % len(self.tiers)], c)
        return out


def _client_ids(cfg: RunConfig) -> tuple[str, ...]:
    n = 1 if cfg.federation.centralized else cfg.federation.num_clients
    return tuple(sorted(str(i) for i in range(n)))


def make_rank_policy(cfg: RunConfig) -> RankPolicy:
    """The policy ``[ranks]`` describes.

    Raises
    ------
    ConfigError
        If a policy object cannot be loaded or lacks ``assign`` / ``max_rank``.
    """
    r = cfg.ranks
    if r.mode == "uniform":
        return FixedRanks(default=cfg.lora.rank, ranks={})
    if r.mode == "map":
        return FixedRanks(default=cfg.lora.rank, ranks=dict(r.map))
    if r.mode == "tiers":
        return TierRanks(tiers=tuple(r.tiers), client_ids=_client_ids(cfg))
    try:
        cls = load_object(r.policy, "ranks.policy")
        policy = cls(max_rank=r.max_rank, seed=cfg.federation.seed)
    except (StrategyError, TypeError) as err:
        raise ConfigError(f"ranks.policy {r.policy!r}: {err}") from None
    if not isinstance(policy, RankPolicy):
        raise ConfigError(
            f"ranks.policy {r.policy!r} built a {type(policy).__name__} without "
            "`assign(server_round, clients)` and `max_rank`"
        )
    return policy
