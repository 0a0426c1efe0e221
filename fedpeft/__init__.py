"""fedpeft: federated fine-tuning of language models with LoRA deltas or seed/scalar pairs,
on Flower.

The Python API::

    import fedpeft

    result = fedpeft.simulate("simulations/tiny.toml", overrides={"federation.rounds": 2})
    result.rows[-1]["eval_loss"], result.adapter
    trained = fedpeft.load_trained(result.out_dir)  # a run folder: base + adapter, as run
    trained.generate(["Define the noun 'harbour'."])

See ``docs/api.md``.
"""

import logging
import warnings

# bitsandbytes (installed for quantized bases) tries, when peft imports it, to fetch an optional
# fused CPU kernel from a model hub, and it and the `kernels` package log a warning when that
# cannot happen (always, offline). Its built-in kernels are used either way: those two loggers
# are quietened to errors before anything imports peft.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# The same import reaches torch.utils.mkldnn, whose class body calls torch.jit.script_method,
# deprecated by torch itself; shown wherever DeprecationWarnings are on (Flower's Ray transport
# turns them on). Imported here once with that one warning off; later imports find it loaded.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)
    import torch.utils.mkldnn  # noqa: E402, F401

from fedpeft.algorithms.capabilities import Capabilities  # noqa: E402
from fedpeft.algorithms.registry import register_strategy  # noqa: E402
from fedpeft.api import SimulationResult, simulate  # noqa: E402
from fedpeft.config import RunConfig  # noqa: E402
from fedpeft.config.load import load_config  # noqa: E402
from fedpeft.errors import (  # noqa: E402
    AggregationError,
    ConfigError,
    DataError,
    FedpeftError,
    ModelError,
    ProtocolError,
    RoundError,
    StrategyError,
)
from fedpeft.trained import Trained, load_trained  # noqa: E402

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
    "Trained",
    "__version__",
    "load_config",
    "load_trained",
    "register_strategy",
    "simulate",
]
