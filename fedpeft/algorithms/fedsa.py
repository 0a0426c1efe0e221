"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", arXiv:2410.01463): ``A`` shared, ``B`` kept on each client.

The paper finds that the ``A`` factors learn what is common to all clients and the ``B``
factors what is specific to each, and shares only ``A``. Per round every client loads the
global ``A`` and its own ``B`` (the global start, zero, in its first round), trains both, and
sends ``A`` only; the coordinator averages the ``A`` factors (example-weighted, like FedIT)
and never sees a ``B``. Uploads are half of FedIT's.

Each client's model is therefore the global ``A`` with its own ``B``: the global adapter alone
(``B`` at its start, zero) changes nothing in the base model, so the run's global evaluation
stays at the base model's loss and the numbers that matter are the personalized ones
(``eval.personalized``: each client's own model on its own held-out records). The personal
``B`` lives in the node's ``Context.state``, which Flower carries across Ray actors and a
deployed node's worker carries too.

Where it deviates: the download still carries the global ``B`` (zero) beside ``A``, so
downloads are those of FedIT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft.algorithms.base import AggregateResult, LoraPlan, StrategyContext
from fedpeft.algorithms.capabilities import weighted_linear
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.registry import register_strategy
from fedpeft.client.node_state import NodeState, require_node
from fedpeft.client.trainer import LoraTrainer, RoundHooks
from fedpeft.errors import ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.wire.messages import Adapter, ClientInfo, LoraUpdate, TrainInstruction

__all__ = ["FedSaLora", "fedsa_round", "personal_adapter"]

STATE = "fedsa-personal-b"  # module -> this client's own B, in its NodeState


def _own_b(adapter: Adapter, node: NodeState | None) -> dict[str, torch.Tensor] | None:
    saved = node.load(STATE) if node is not None else None
    if saved is None:
        return None
    for m, f in adapter.items():
        if m not in saved or saved[m].shape != f.b.shape:
            got = tuple(saved[m].shape) if m in saved else None
            raise ProtocolError(
                f"this node's personal B for {m!r} is {got}, the global adapter's is "
                f"{tuple(f.b.shape)}; a run keeps one rank per node"
            )
    return saved


def personal_adapter(adapter: Adapter, node: NodeState | None) -> Adapter:
    """The global ``A`` with this node's own ``B`` (the global ``B`` before its first round)."""
    own = _own_b(adapter, node)
    if own is None:
        return adapter
    return {m: replace(f, b=own[m].to(f.b.dtype)) for m, f in adapter.items()}


def fedsa_round(
    handle: ModelHandle, name: str, ins: TrainInstruction, node: NodeState | None
) -> RoundHooks:
    """Load this node's ``B``, train ``A`` and ``B``, keep ``B``; only ``A`` travels back."""
    node = require_node(node, "fedsa", "each client's B")
    if ins.parts != "A":
        raise ProtocolError(f"a fedsa instruction sends back A only, this one asks {ins.parts!r}")
    layers = dict(handle.lora_layers(name))
    own = _own_b(ins.adapter, node)
    if own is not None:
        with torch.no_grad():
            for m, layer in layers.items():
                w = layer.lora_B[name].weight
                w.copy_(own[m].to(w.device, w.dtype))

    def finish() -> dict[str, float]:
        trained = {m: layer.lora_B[name].weight.detach().cpu() for m, layer in layers.items()}
        node.save(STATE, trained)
        with torch.no_grad():  # the reply's B is the one sent: B never leaves the node
            for m, layer in layers.items():
                w = layer.lora_B[name].weight
                w.copy_(ins.adapter[m].b.to(w.device, w.dtype))
        return {
            "personal_b_norm": sum(float(t.double().pow(2).sum()) for t in trained.values()) ** 0.5
        }

    return RoundHooks(parts="AB", finish=finish)


class FedSaLora:
    """FedSA-LoRA: the coordinator averages ``A``; each client keeps its own ``B``."""

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedSaLora`."""

        weighted: bool = True  # weight clients by num_examples (False: plain mean)

    capabilities = staticmethod(weighted_linear("lora", personal=True))
    trainer = LoraTrainer(begin=fedsa_round, personal=personal_adapter)  # the client half

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.inner = FedAvg(FedAvg.Config(weighted=config.weighted), ctx)

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Every client gets the global adapter and sends back ``A`` only."""
        plans = self.inner.configure_train(server_round, clients)
        return {cid: replace(p, parts="A") for cid, p in plans.items()}

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """The weighted mean of ``A``; ``B`` stays the global start (every update carries it)."""
        return self.inner.aggregate_train(server_round, updates)

    def state_dict(self) -> dict[str, Any]:
        """The global adapter."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the global adapter."""
        self.inner.load_state_dict(state)


register_strategy("fedsa", FedSaLora)
