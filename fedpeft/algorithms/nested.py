"""Nested-rank training for the heterogeneous-rank algorithms (``strategy.options.nested``).

DyLoRA (Valipour et al., EACL 2023, arXiv:2210.07558) trains a LoRA module so that every
prefix of its rank components works on its own: at each step it samples a truncation rank
``b`` and trains the rank-``b`` adapter ``s B[:, :b] A[:b]``. With mixed ranks that is what
the coordinator relies on: HetLoRA and FlexLoRA hand a rank-``r_k`` client the first ``r_k``
components of the global update, so components that only high-rank clients train are
diluted or cut ("rank collapse"; raFLoRA, 2026, measures it as the energy of each rank
component of the global update, which fedpeft records per round as ``rank_energy``).

Here, each local step draws ``b`` uniformly from ``1..r_k`` (from the round's seed, so a
round is reproducible) and masks the components past ``b``: the output of ``lora_A`` is
multiplied by ``[1]*b + [0]*(r_k - b)``, so those components neither act nor get gradients
that step. The scale stays ``alpha / r_k`` (DyLoRA rescales by ``alpha / b``); with it, the
truncated adapter is exactly the prefix a lower-rank client would be sent (the strategies'
unit-scale globals). AdamW's moments still move a masked component by its momentum.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.client.node_state import NodeState
from fedpeft.client.trainer import RoundHooks
from fedpeft.lora.handle import ModelHandle
from fedpeft.seeding import torch_generator
from fedpeft.wire.messages import TrainInstruction

__all__ = ["NESTED", "nested_round"]

NESTED = "nested"  # the option's name in the instruction's options


def nested_round(
    handle: ModelHandle, name: str, ins: TrainInstruction, node: NodeState | None
) -> RoundHooks:
    """Hooks that mask the rank components past a per-step random truncation (when the
    instruction's options ask for ``nested``; otherwise none)."""
    if not ins.options.get(NESTED):
        return RoundHooks()
    rank = ins.lora.rank
    gen = torch_generator(ins.seed, "nested-rank")
    mask = torch.ones(rank, device=handle.device)  # (r,) 1 for the kept components
    drawn: list[int] = []

    def draw() -> None:
        b = int(torch.randint(1, rank + 1, (1,), generator=gen))
        mask.zero_()
        mask[:b] = 1.0
        drawn.append(b)

    def masked(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * mask.to(output.dtype)  # (..., r) * (r,)

    draw()
    handles = [
        layer.lora_A[name].register_forward_hook(masked) for _, layer in handle.lora_layers(name)
    ]

    def after_step() -> None:
        draw()

    def finish() -> dict[str, float]:
        used = drawn[:-1] or drawn  # the last draw is for a step that never ran
        return {"nested_mean_rank": sum(used) / len(used)}

    def close() -> None:
        for h in handles:
            h.remove()
        mask.fill_(1.0)

    return RoundHooks(after_step=after_step, finish=finish, close=close)
