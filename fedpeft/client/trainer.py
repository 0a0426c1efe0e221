"""Local trainers: turn a training instruction and local data into an update.

:class:`LoraTrainer` runs AdamW on the adapter only (the base model stays frozen), starting
each round from the global factors the instruction carries, with a fresh optimizer state (as
FedIT and FedAvg do). Data order and LoRA dropout come from the instruction's seed, so a
client round is reproducible on any backend. :class:`NoopTrainer` echoes the factors back
unchanged; benchmarks use it to measure the simulation's own overhead.

An algorithm's client half is its strategy class's ``trainer`` attribute (any object with
``fit(handle, ins, data)``), found by :func:`trainer_for` from the scenario the client runs;
most algorithms hook into the shared loop instead of writing one: ``LoraTrainer(penalty=f)``
adds ``f(handle, adapter_name, ins)()`` to every micro-batch loss (FedProx's proximal term,
``strategies/fedprox.py``), and ``ins.options`` carries the algorithm's per-client values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedpeft.config import TrainConfig
from fedpeft.data.tokenize import Example, collate
from fedpeft.errors import ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.seeding import derive_seed, scoped_torch_seed, torch_generator
from fedpeft.wire.messages import Header, LoraUpdate, TrainInstruction

__all__ = [
    "ClientData",
    "LoraTrainer",
    "NoopTrainer",
    "PenaltyHook",
    "Trainer",
    "batch_stream",
    "local_steps",
    "make_trainer",
    "reply_header",
    "run_steps",
]


@dataclass(frozen=True)
class ClientData:
    """A client's tokenized training examples."""

    client_id: str
    examples: list[Example]


class Trainer(Protocol):
    """Local training protocol."""

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Train from ``ins`` on ``data`` and return the update."""
        ...


def local_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimizer steps this round: ``local_steps``, or ``ceil(epochs * n / (batch * accum))``."""
    if train.epochs > 0:
        per_step = train.batch_size * train.grad_accum
        return max(1, math.ceil(train.epochs * num_examples / per_step))
    return train.local_steps


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless epochs of shuffled index batches; the last short batch of an epoch is kept."""
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def reply_header(ins: TrainInstruction, handle: ModelHandle, data: ClientData) -> Header:
    return Header(
        run_id=ins.header.run_id,
        server_round=ins.header.server_round,
        model_fingerprint=handle.fingerprint,
        adapter_hash=ins.lora.config_hash(),
        num_examples=len(data.examples),
        client_id=data.client_id,
    )


def _tail_norm(handle: ModelHandle, name: str, keep: int) -> torch.Tensor:
    """HetLoRA's penalty: ``sum_m ||A_m[keep:]||_F + ||B_m[:, keep:]||_F`` (differentiable)."""
    total = torch.zeros((), device=handle.device)
    for _, layer in handle.lora_layers(name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        total = total + a[keep:].norm() + b[:, keep:].norm()
    return total


def run_steps(
    handle: ModelHandle,
    name: str,
    ins: TrainInstruction,
    data: ClientData,
    batches: Iterator[list[int]],
    steps: int,
    losses: list[float],
    penalty: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """``steps`` AdamW steps (fresh optimizer) on the factors ``ins.parts`` of adapter ``name``.

    Inside ``handle.training(name)``; appends every micro-batch loss to ``losses``;
    ``penalty`` is added to each micro-batch loss, ``after_backward`` runs before each step.
    """
    train = ins.train
    pad = handle.tokenizer.pad_token_id
    model = handle.peft_model(name)
    params = handle.trainable_parameters(name, ins.parts)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(train.grad_accum):
            batch = collate([data.examples[i] for i in next(batches)], pad, handle.device)
            loss = model(**batch).loss
            losses.append(float(loss.detach()))
            if penalty is not None:
                loss = loss + penalty()
            (loss / train.grad_accum).backward()
        if after_backward is not None:
            after_backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)


def batch_stream(ins: TrainInstruction, data: ClientData) -> Iterator[list[int]]:
    """The round's shuffled batches, seeded by the instruction."""
    return _batches(len(data.examples), ins.train.batch_size, torch_generator(ins.seed, "batches"))


PenaltyHook = Callable[[ModelHandle, str, TrainInstruction], Callable[[], torch.Tensor]]


class LoraTrainer:
    """AdamW on the LoRA factors the instruction asks to train (``parts``).

    ``penalty``: an algorithm's hook, called once the round's factors are loaded (so it can
    keep them), returning the term added to every micro-batch loss.


    FLoRA's frozen global adapter (``ins.base``) is merged into the base weights for the
    round. HetLoRA's rank self-pruning (Cho et al. 2024): with ``reg_lambda > 0`` the loss
    gains ``lambda * (||A[g:]|| + ||B[:, g:]||)`` with ``g = floor(gamma r)``; when that tail
    norm ends the round below where it started, the client reports ``prune_rank = g`` and
    the coordinator trains it at that rank from then on. An instruction with a pruning plan
    goes to :class:`~fedpeft.client.prune_trainer.PruneTrainer` (the client app decides).
    """

    def __init__(self, penalty: PenaltyHook | None = None) -> None:
        self.penalty = penalty

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Run the instruction's local steps and return the trained factors."""
        if ins.prune is not None:
            raise ProtocolError(
                "an instruction with a pruning plan goes to PruneTrainer, not LoraTrainer"
            )
        t0 = time.perf_counter()
        name = handle.ensure_adapter(ins.lora)
        handle.set_factors(name, ins.adapter)
        steps = local_steps(ins.train, len(data.examples))
        keep = max(1, math.floor(ins.reg_gamma * ins.lora.rank))
        prune = ins.reg_lambda > 0 and keep < ins.lora.rank
        losses: list[float] = []
        with (
            scoped_torch_seed(derive_seed(ins.seed, "dropout")),
            handle.merged(ins.base),
            handle.training(name),
        ):
            with torch.no_grad():
                tail_start = float(_tail_norm(handle, name, keep)) if prune else 0.0
            terms: list[Callable[[], torch.Tensor]] = []
            if prune:
                terms.append(lambda: ins.reg_lambda * _tail_norm(handle, name, keep))
            if self.penalty is not None:
                terms.append(self.penalty(handle, name, ins))
            penalty = _summed(terms) if terms else None
            run_steps(handle, name, ins, data, batch_stream(ins, data), steps, losses, penalty)
            metrics = {
                "train_loss": sum(losses) / len(losses),
                "steps": float(steps),
            }
            if prune:
                with torch.no_grad():
                    tail_end = float(_tail_norm(handle, name, keep))
                if tail_end < tail_start:
                    metrics["prune_rank"] = float(keep)
        metrics["train_s"] = time.perf_counter() - t0
        return LoraUpdate(
            header=reply_header(ins, handle, data),
            factors=handle.get_factors(name),
            metrics=metrics,
        )


def _summed(terms: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    def total() -> torch.Tensor:
        out = terms[0]()
        for term in terms[1:]:
            out = out + term()
        return out

    return total


class NoopTrainer:
    """Returns the instruction's factors unchanged (measures framework overhead)."""

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Echo the global factors back."""
        return LoraUpdate(
            header=reply_header(ins, handle, data), factors=ins.adapter, metrics={"steps": 0.0}
        )


def make_trainer(kind: str, algorithm: type[Any] | None = None) -> Trainer:
    """The trainer named by ``train.trainer`` (``noop``), else the algorithm's client half:
    its strategy class's ``trainer``, or the shared :class:`LoraTrainer`."""
    if kind == "noop":
        return NoopTrainer()
    own = getattr(algorithm, "trainer", None) if algorithm is not None else None
    return own if own is not None else LoraTrainer()
