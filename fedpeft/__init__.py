"""fedpeft: federated fine-tuning of language models with LoRA deltas or seed/scalar pairs,
on Flower.

The Python API::

    import fedpeft

    result = fedpeft.simulate("simulations/tiny.toml", overrides={"federation.rounds": 2})
    result.rows[-1]["eval_loss"], result.adapter

See ``docs/api.md``.
"""

from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.registry import register_strategy
from fedpeft.api import SimulationResult, simulate
from fedpeft.config import RunConfig
from fedpeft.config.load import load_config
from fedpeft.errors import (
    AggregationError,
    ConfigError,
    DataError,
    FedpeftError,
    ModelError,
    ProtocolError,
    RoundError,
    StrategyError,
)

__version__ = "0.1.0"

__all__ = [
    "AggregationError",
    "Capabilities",
    "ConfigError",
    "DataError",
    "FedpeftError",
    "ModelError",
    "ProtocolError",
    "RoundError",
    "RunConfig",
    "SimulationResult",
    "StrategyError",
    "__version__",
    "load_config",
    "register_strategy",
    "simulate",
]
