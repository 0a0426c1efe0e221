"""SCAFFOLD on the LoRA factors (Karimireddy et al., ICML 2020, arXiv:1910.06378).

Client drift on non-IID data comes from each client descending its own objective for several
local steps. SCAFFOLD corrects every local step with control variates: the server's ``c``
(an estimate of the global update direction) and the client's own ``c_i``::

    local step:   y <- y - lr (g_i(y) - c_i + c)
    after K steps (the paper's option II):
                  c_i+ = c_i - c + (x - y) / (K lr)          # x: the factors it was sent
    server:       x <- x + mean_k (y_k - x)                  # global step size 1 (FedAvg)
                  c <- c + (|S| / N) mean_k (c_k+ - c_k)

Here ``x``, ``y``, ``c`` and ``c_i`` are the trained LoRA factors (``A`` and ``B`` per module)
and ``c`` travels to every client beside the adapter (the instruction's ``aux``, so the
download doubles). The client variate is per node and lives in the node's ``Context.state``
(:class:`~fedpeft.client.node_state.NodeState`), which Flower carries across Ray actors and a
deployed node's worker.

Where it deviates from the paper:

- Clients run AdamW, not SGD: the correction ``-lr (c - c_i)`` is applied to the factors after
  every optimizer step (as OpenFedLLM does), so ``c`` and ``c_i`` are in units of the local
  steps' mean displacement per unit rate, the same units the option-II update produces.
- The clients' variate changes are not uploaded: since ``c_k+ - c_k = -c + (x - y_k) /
  (K lr)``, their weighted mean is ``-c + (x - x_new) / (K lr)``, which the coordinator
  computes from the new global alone. Uploads stay those of FedAvg, and the strategy stays
  linear (secure aggregation and DP deliver exactly what it needs). Means use FedAvg's
  weights (``num_examples`` shares unless ``weighted = false``).
- ``|S| / N`` is the fraction of clients sampled (planned) this round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
    adapter_from_state,
    adapter_state,
)
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.registry import register_strategy
from fedpeft.client.node_state import NodeState, require_node
from fedpeft.client.trainer import LoraTrainer, RoundHooks
from fedpeft.errors import AggregationError, ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraUpdate, TrainInstruction

__all__ = ["Scaffold", "next_variate", "scaffold_round"]

STATE = "scaffold-variate"  # the node's c_i in its NodeState


def next_variate(
    ci: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Option II: ``c_i+ = c_i - c + (x - y) / (steps * lr)`` (any one factor's shape)."""
    return ci - c + (x - y) / (steps * lr)


def _factor_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {f"{m}.{p}": t for m, f in adapter.items() for p, t in (("A", f.a), ("B", f.b))}


def scaffold_round(
    handle: ModelHandle, name: str, ins: TrainInstruction, node: NodeState | None
) -> RoundHooks:
    """SCAFFOLD's client half for one round: correct every step, then update ``c_i``."""
    node = require_node(node, "scaffold", "each client's control variate")
    if ins.aux is None:
        raise ProtocolError("a scaffold instruction carries the server control variate (aux)")
    lr = ins.train.lr
    params: dict[str, torch.Tensor] = {}
    for m, layer in handle.lora_layers(name):
        for part, table in (("A", layer.lora_A), ("B", layer.lora_B)):
            if part in ins.parts:
                params[f"{m}.{part}"] = table[name].weight
    c = _factor_tensors(ins.aux)
    if set(params) - set(c):
        missing = sorted(set(params) - set(c))[:3]
        raise ProtocolError(f"the server control variate lacks the trained factors {missing}")
    saved = node.load(STATE) or {}
    ci = {k: saved.get(k, torch.zeros_like(c[k])) for k in params}
    for k in params:
        if ci[k].shape != c[k].shape or c[k].shape != params[k].shape:
            raise ProtocolError(
                f"{k}: control variates {tuple(c[k].shape)} / {tuple(ci[k].shape)} do not fit "
                f"the factor {tuple(params[k].shape)}"
            )
    start = {k: p.detach().clone() for k, p in params.items()}  # x
    dev = {k: p.device for k, p in params.items()}
    correction = {k: (c[k] - ci[k]).to(dev[k], params[k].dtype) for k in params}  # c - c_i
    steps = [0]

    def after_step() -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(lr * correction[k])  # y <- y - lr (c - c_i)
        steps[0] += 1

    def finish() -> dict[str, float]:
        new = {
            k: next_variate(ci[k], c[k], start[k].cpu(), p.detach().cpu(), steps[0], lr)
            for k, p in params.items()
        }
        node.save(STATE, {**saved, **new})
        norm = sum(float(t.double().pow(2).sum()) for t in correction.values()) ** 0.5
        return {"scaffold_correction_norm": norm}

    return RoundHooks(after_step=after_step, finish=finish)


class Scaffold:
    """SCAFFOLD: FedAvg's aggregation with server and client control variates."""

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`Scaffold`."""

        weighted: bool = True  # weight clients by num_examples (False: plain mean)

    @staticmethod
    def capabilities(options: Any) -> Capabilities:
        """Linear (the control variate follows from the mean), one rank, fixed local steps."""
        return Capabilities(
            family="lora", linear=True, example_weighted=bool(options.weighted), fixed_steps=True
        )

    trainer = LoraTrainer(begin=scaffold_round)  # the client half

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self.inner = FedAvg(FedAvg.Config(weighted=config.weighted), ctx)
        self.c: Adapter = {
            m: LoraFactors(torch.zeros_like(f.a), torch.zeros_like(f.b), f.alpha)
            for m, f in ctx.initial.items()
        }
        self._sent: Adapter | None = None
        self._planned = 0

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """FedAvg's plans, each carrying the server control variate ``c``."""
        plans = self.inner.configure_train(server_round, clients)
        self._sent = next(iter(plans.values())).adapter if plans else None
        self._planned = len(plans)
        return {cid: replace(p, aux=self.c) for cid, p in plans.items()}

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """FedAvg's new global ``x_new``; ``c += (|S| / N) (-c + (x - x_new) / (K lr))``."""
        if self._sent is None:
            raise AggregationError("scaffold aggregated a round it did not plan")
        result = self.inner.aggregate_train(server_round, updates)
        if result.adapter is None:
            raise AggregationError("scaffold's FedAvg returned no adapter")
        train = self.ctx.round_train(server_round)
        scale = train.local_steps * train.lr
        share = min(1.0, self._planned / self.ctx.num_clients) if self.ctx.num_clients else 1.0
        new_c: dict[str, LoraFactors] = {}
        for m, c in self.c.items():
            x, x_new = self._sent[m], result.adapter[m]
            dc_a = -c.a + (x.a - x_new.a) / scale  # (r, in)
            dc_b = -c.b + (x.b - x_new.b) / scale  # (out, r)
            new_c[m] = LoraFactors(c.a + share * dc_a, c.b + share * dc_b, c.alpha)
        self.c = new_c
        norm = sum(
            float(f.a.double().pow(2).sum() + f.b.double().pow(2).sum()) for f in new_c.values()
        )
        return replace(result, metrics={**result.metrics, "scaffold_c_norm": norm**0.5})

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the server control variate."""
        return {"inner": self.inner.state_dict(), "c": adapter_state(self.c)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state["inner"])
        self.c = adapter_from_state(state["c"])


register_strategy("scaffold", Scaffold)
