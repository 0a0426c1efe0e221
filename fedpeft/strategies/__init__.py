"""Aggregation strategies: the protocol, the registry and the in-tree algorithms."""

from fedpeft.strategies.base import AggregateResult, LoraPlan, Strategy, StrategyContext
from fedpeft.strategies.fedavg import FedAvg
from fedpeft.strategies.fedkseed import FedKSeed, FedKSeedPro
from fedpeft.strategies.fedspine import FedSpine
from fedpeft.strategies.ferret import Ferret
from fedpeft.strategies.ffa import FfaLora
from fedpeft.strategies.flexlora import FlexLora
from fedpeft.strategies.flora import FLora
from fedpeft.strategies.hetlora import HetLora
from fedpeft.strategies.registry import build_strategy, register_strategy, registered, resolve
from fedpeft.strategies.rolora import RoLora

__all__ = [
    "AggregateResult",
    "FLora",
    "FedAvg",
    "FedKSeed",
    "FedKSeedPro",
    "FedSpine",
    "Ferret",
    "FfaLora",
    "FlexLora",
    "HetLora",
    "LoraPlan",
    "RoLora",
    "Strategy",
    "StrategyContext",
    "build_strategy",
    "register_strategy",
    "registered",
    "resolve",
]
