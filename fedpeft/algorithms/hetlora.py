"""HetLoRA (Cho et al., EMNLP 2024, arXiv:2401.06432): zero-padding, self-pruning, norm weights.

Each client trains its own rank ``r_k`` and receives the first ``r_k`` components of the
rank-``r_max`` global adapter. The coordinator zero-pads every update to ``r_max`` and
averages ``A`` and ``B`` separately with **sparsity weights** ``p~_k = S_k / sum_j S_j``,
``S_k = ||s_k B_k A_k||_F`` (computed from the small factors, never the dense product)::

    B~ = sum_k p~_k pad(s_k B_k)    # (out, r_max), unit scale
    A  = sum_k p~_k pad(A_k)        # (r_max, in)

Like FedIT this is inexact (``B~ A`` has cross terms ``B_i A_j``); the exactness test prints
how far. **Rank self-pruning** runs on the client: the loss gains
``lambda (||A[g:]|| + ||B[:, g:]||)`` with ``g = floor(gamma r_k)`` (the form community code
uses; the paper's exact regulariser is not public in full), and when that tail norm ends a
round lower than it started the client reports ``prune_rank = g``; it trains at that rank
from the next round on (the client half: :data:`HetLora.trainer`, the shared LoRA loop with
:func:`tail_penalty` and :func:`tail_report`; ``reg_lambda`` and ``reg_gamma`` travel in the
instruction's options). With ``weighting = "examples"`` and ``reg_lambda = 0`` this is the
zero-padding FedIT baseline of the FLoRA paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.algorithms.base import (
    AggregateResult,
    LoraPlan,
    StrategyContext,
)
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.hetero import (
    UnitGlobal,
    example_weights,
    ordered,
    padded_sum,
    plans_from_global,
    ranks_for,
)
from fedpeft.algorithms.nested import NESTED, nested_round
from fedpeft.algorithms.registry import register_strategy
from fedpeft.client.trainer import LoraTrainer
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.lora.rank_ops import product_norm
from fedpeft.wire.messages import ClientInfo, LoraFactors, LoraUpdate, TrainInstruction

__all__ = ["HetLora", "tail_penalty", "tail_report"]


def _self_pruning(ins: TrainInstruction) -> tuple[float, int] | None:
    """``(lambda, g)`` when this round self-prunes (``reg_lambda > 0`` and ``g < r``)."""
    lam = float(ins.options.get("reg_lambda", 0.0))
    gamma = float(ins.options.get("reg_gamma", 1.0))
    if not (lam >= 0 and 0 < gamma <= 1):
        raise ProtocolError(
            f"reg_gamma must be in (0, 1] and reg_lambda >= 0, got {gamma} and {lam}"
        )
    keep = max(1, math.floor(gamma * ins.lora.rank))
    return (lam, keep) if lam > 0 and keep < ins.lora.rank else None


def _tail_norm(handle: ModelHandle, name: str, keep: int) -> torch.Tensor:
    """``sum_m ||A_m[keep:]||_F + ||B_m[:, keep:]||_F`` (differentiable)."""
    total = torch.zeros((), device=handle.device)
    for _, layer in handle.lora_layers(name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
        total = total + a[keep:].norm() + b[:, keep:].norm()
    return total


def tail_penalty(
    handle: ModelHandle, name: str, ins: TrainInstruction
) -> Callable[[], torch.Tensor] | None:
    """The self-pruning term ``lambda * tail norm`` (None when this round does not prune)."""
    pruning = _self_pruning(ins)
    if pruning is None:
        return None
    lam, keep = pruning
    return lambda: lam * _tail_norm(handle, name, keep)


def tail_report(
    handle: ModelHandle, name: str, ins: TrainInstruction
) -> Callable[[], dict[str, float]]:
    """After training: ``prune_rank = g`` if the tail norm ended below where it started."""
    pruning = _self_pruning(ins)
    if pruning is None:
        return lambda: {}
    keep = pruning[1]
    with torch.no_grad():
        start = float(_tail_norm(handle, name, keep))

    def report() -> dict[str, float]:
        with torch.no_grad():
            end = float(_tail_norm(handle, name, keep))
        return {"prune_rank": float(keep)} if end < start else {}

    return report


class HetLora:
    """HetLoRA: zero-padded, norm-weighted averaging; truncation to each client's rank."""

    # the client half: self-pruning's penalty and report, nested-rank training (option nested)
    trainer = LoraTrainer(penalty=tail_penalty, report=tail_report, begin=nested_round)

    @staticmethod
    def capabilities(config: HetLora.Config) -> Capabilities:
        """Norm weights (the paper's) ignore num_examples; ``weighting = "examples"`` uses it."""
        return Capabilities(
            family="lora",
            heterogeneous_ranks=True,
            example_weighted=config.weighting == "examples",
        )

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`HetLora`."""

        weighting: str = "norm"  # norm (sparsity-weighted, the paper) | examples (FedIT weights)
        reg_lambda: float = 0.0  # self-pruning penalty weight (0: no self-pruning)
        reg_gamma: float = 0.99  # self-pruning keeps floor(gamma r) ranks (paper's decay factor)
        nested: bool = False  # DyLoRA-style nested-rank training (fedpeft.algorithms.nested)

        def __post_init__(self) -> None:
            problems = []
            if self.weighting not in ("norm", "examples"):
                problems.append(f"weighting must be norm|examples, got {self.weighting!r}")
            if self.reg_lambda < 0:
                problems.append(f"reg_lambda must be >= 0, got {self.reg_lambda}")
            if not 0 < self.reg_gamma <= 1:
                problems.append(f"reg_gamma must be in (0, 1], got {self.reg_gamma}")
            if problems:
                raise ConfigError([f"strategy.options.{p}" for p in problems])

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self._global = UnitGlobal(ctx)
        self._pruned: dict[str, int] = {}  # client id -> self-pruned rank

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Each client gets the global truncated to its (possibly self-pruned) rank."""
        ranks = ranks_for(self.ctx, server_round, clients, self._pruned)
        c = self.config
        options: dict[str, bool | int | float | str] = (
            {"reg_lambda": c.reg_lambda, "reg_gamma": c.reg_gamma} if c.reg_lambda else {}
        )
        if c.nested:
            options[NESTED] = True
        return plans_from_global(self.ctx, self._global.adapter, ranks, options=options)

    def _weights(self, ups: Sequence[LoraUpdate], modules: Sequence[str]) -> list[float]:
        if self.config.weighting == "examples":
            return example_weights(ups, True)
        norms = [
            sum(product_norm(u.factors[m]) ** 2 for m in modules) ** 0.5 for u in ups
        ]  # ||s B A||_F over all modules
        total = sum(norms)
        if total <= 0:  # every update is zero (e.g. B = 0): fall back to examples
            return example_weights(ups, True)
        return [n / total for n in norms]

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Zero-pad to ``r_max``, weight by ``||s_k B_k A_k||``, average ``A`` and ``B``."""
        ups, modules = ordered(updates, "hetlora")
        weights = self._weights(ups, modules)
        rank = next(iter(self._global.adapter.values())).rank
        out: dict[str, LoraFactors] = {}
        for m in modules:
            b = padded_sum(ups, m, weights, rank, "B")  # (out, r_max)
            a = padded_sum(ups, m, weights, rank, "A")  # (r_max, in)
            out[m] = LoraFactors(a=a.float(), b=b.float(), alpha=float(rank))
        for u in ups:
            if "prune_rank" in u.metrics:
                self._pruned[u.header.client_id] = max(1, int(u.metrics["prune_rank"]))
        metrics = {"hetlora_clients": float(len(ups))}
        if self._pruned:
            metrics["hetlora_pruned_clients"] = float(len(self._pruned))
        return self._global.update(out, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The global adapter and the self-pruned ranks."""
        return {**self._global.state(), "pruned": dict(self._pruned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._global.load(state)
        self._pruned = {str(k): int(v) for k, v in state.get("pruned", {}).items()}


register_strategy("hetlora", HetLora)
