"""FedProx on the LoRA factors: an out-of-tree fedpeft algorithm with both halves in one file.

Use it from a scenario without installing anything::

    [strategy]
    name = "strategies/fedprox.py:FedProx"
    options = { mu = 0.01 }

FedProx (Li et al., MLSys 2020, "Federated Optimization in Heterogeneous Networks") adds a
proximal term to each client's local objective,

    min_w  f_k(w) + (mu / 2) ||w - w_t||^2,

which keeps a client's local steps near the global model ``w_t`` it was sent and so limits
client drift on non-IID data. Here ``w`` is the trained LoRA factors (``A`` and ``B``; the
base model is frozen), so the term is ``(mu / 2) sum ||A - A_t||_F^2 + ||B - B_t||_F^2`` over
the adapted modules. The coordinator half is FedAvg (FedIT: example-weighted means of ``A``
and ``B``); ``mu`` travels to every client in its instruction's options record. With
``mu = 0`` this is FedAvg exactly. The paper also lets clients do variable amounts of work
(inexact solutions); fedpeft's clients run ``train.local_steps`` each, as the paper's
experiments with a fixed budget do.

The two halves:

- coordinator: :class:`FedProx` (``configure_train`` adds ``{"mu": mu}`` to FedAvg's plans);
- client: ``FedProx.trainer``, fedpeft's LoRA loop with :func:`proximal_term` as its penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft.algorithms.base import AggregateResult, LoraPlan, StrategyContext
from fedpeft.algorithms.capabilities import weighted_linear
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.client.trainer import LoraTrainer
from fedpeft.errors import ConfigError
from fedpeft.lora.handle import ModelHandle
from fedpeft.wire.messages import ClientInfo, LoraUpdate, TrainInstruction


def proximal_term(
    handle: ModelHandle, adapter: str, ins: TrainInstruction
) -> Callable[[], torch.Tensor]:
    """``(mu / 2) ||w - w_t||^2`` over the trained factors, ``w_t`` as loaded for the round."""
    mu = float(ins.options.get("mu", 0.0))
    params = handle.trainable_parameters(adapter, ins.parts)
    start = [p.detach().clone() for p in params]  # w_t: the factors the client was sent

    def term() -> torch.Tensor:
        total = torch.zeros((), device=start[0].device)
        for p, p0 in zip(params, start, strict=True):
            total = total + (p - p0).pow(2).sum()
        return (mu / 2) * total

    return term


class FedProx:
    """FedAvg's aggregation plus a proximal term in every client's local objective."""

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedProx`."""

        mu: float = 0.01  # weight of the proximal term (0: FedAvg)
        weighted: bool = True  # weight clients by num_examples (False: plain mean)

        def __post_init__(self) -> None:
            if not self.mu >= 0:
                raise ConfigError(f"strategy.options.mu must be >= 0, got {self.mu}")

    capabilities = staticmethod(weighted_linear("lora"))  # FedAvg's: linear, one rank
    trainer = LoraTrainer(penalty=proximal_term)  # the client half

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.inner = FedAvg(FedAvg.Config(weighted=config.weighted), ctx)

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """FedAvg's plans, each telling its client ``mu``."""
        plans = self.inner.configure_train(server_round, clients)
        return {c: replace(p, options={"mu": self.config.mu}) for c, p in plans.items()}

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """FedAvg's aggregate."""
        return self.inner.aggregate_train(server_round, updates)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state (the global adapter)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore FedAvg's state."""
        self.inner.load_state_dict(state)
