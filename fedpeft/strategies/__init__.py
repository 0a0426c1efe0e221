"""Aggregation strategies: the protocol, the registry and the in-tree algorithms."""

from fedpeft.strategies.base import AggregateResult, LoraPlan, Strategy, StrategyContext
from fedpeft.strategies.fedavg import FedAvg
from fedpeft.strategies.registry import build_strategy, register_strategy, registered, resolve

__all__ = [
    "AggregateResult",
    "FedAvg",
    "LoraPlan",
    "Strategy",
    "StrategyContext",
    "build_strategy",
    "register_strategy",
    "registered",
    "resolve",
]
