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
import os
import warnings

# OpenMP threads that spin between parallel regions steal the cores a busy host (a phone, a
# shared server) needs: measured on 2 cores with another process on one (benchmarks/zo_step.py,
# docs/zeroth-order.md), OpenMP's default made SmolLM2's 1 x 256 forward passes 3x slower and a
# direction regeneration 6x slower than PASSIVE, which costs nothing measurable when quiet. Set
# before torch loads OpenMP (a process that imported torch first keeps its policy); an explicit
# OMP_WAIT_POLICY wins, and FEDPEFT_OMP_WAIT_POLICY=default keeps OpenMP's own.
if os.environ.get("FEDPEFT_OMP_WAIT_POLICY", "PASSIVE").upper() != "DEFAULT":
    os.environ.setdefault("OMP_WAIT_POLICY", os.environ.get("FEDPEFT_OMP_WAIT_POLICY", "PASSIVE"))

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
