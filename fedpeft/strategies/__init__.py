"""Aggregation strategies: the protocol, the registry and the in-tree algorithms."""

from fedpeft.strategies.base import AggregateResult, LoraPlan, Strategy, StrategyContext
from fedpeft.strategies.fedavg import FedAvg
from fedpeft.strategies.fedkseed import FedKSeed, FedKSeedPro
from fedpeft.strategies.ferret import Ferret
from fedpeft.strategies.registry import build_strategy, register_strategy, registered, resolve

__all__ = [
    "AggregateResult",
    "FedAvg",
    "FedKSeed",
    "FedKSeedPro",
    "Ferret",
    "LoraPlan",
    "Strategy",
    "StrategyContext",
    "build_strategy",
    "register_strategy",
    "registered",
    "resolve",
]
