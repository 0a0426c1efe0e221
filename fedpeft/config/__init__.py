"""Run configuration: the sections (:mod:`.sections`), loading (:mod:`.load`) and the
cross-section rules (:mod:`.rules`).

``from fedpeft.config import RunConfig`` gives the section dataclasses; loading lives in
:mod:`fedpeft.config.load` so that importing a section never imports the strategy registry.
"""

from fedpeft.config.sections import (
    ATTACKS,
    CODECS,
    AttackConfig,
    CompressConfig,
    DataConfig,
    DevicesConfig,
    DpConfig,
    EvalConfig,
    FederationConfig,
    LoraSection,
    ModelConfig,
    RanksConfig,
    RobustConfig,
    RunConfig,
    SecAggConfig,
    ServerOptConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
    ValidationConfig,
    ZoConfig,
)

__all__ = [
    "ATTACKS",
    "CODECS",
    "AttackConfig",
    "CompressConfig",
    "DataConfig",
    "DevicesConfig",
    "DpConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "RanksConfig",
    "RobustConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerOptConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "ValidationConfig",
    "ZoConfig",
]
