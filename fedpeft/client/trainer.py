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
``LoraTrainer(begin=g)`` gets the node's own state (:class:`~fedpeft.client.node_state.
NodeState`) and returns :class:`RoundHooks` for the round (SCAFFOLD's control variate,
FedSA-LoRA's personal ``B``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedpeft.client.memory import MemoryMeter
from fedpeft.client.node_state import NodeState
from fedpeft.config import TrainConfig
from fedpeft.data.tokenize import Example, collate
from fedpeft.errors import ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.seeding import derive_seed, scoped_torch_seed, torch_generator
from fedpeft.wire.messages import Adapter, Header, LoraUpdate, TrainInstruction

__all__ = [
    "BeginHook",
    "ClientData",
    "LoraTrainer",
    "NoopTrainer",
    "PenaltyHook",
    "PersonalHook",
    "ReportHook",
    "RoundHooks",
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
    """Local training protocol.

    A trainer that keeps per-node state between rounds sets ``stateful = True``; the client
    then calls ``fit(handle, ins, data, node=NodeState(...))``.
    """

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
    after_step: Callable[[], None] | None = None,
    parts: str | None = None,
    meter: MemoryMeter | None = None,
) -> None:
    """``steps`` AdamW steps (fresh optimizer) on the factors ``parts`` (default
    ``ins.parts``) of adapter ``name``.

    Inside ``handle.training(name)``; appends every micro-batch loss to ``losses``;
    ``penalty`` is added to each micro-batch loss, ``after_backward`` runs before each step
    and ``after_step`` after it; ``meter`` measures the steps' memory.
    """
    train = ins.train
    pad = handle.tokenizer.pad_token_id
    model = handle.peft_model(name)
    params = handle.trainable_parameters(name, parts or ins.parts)
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if meter is not None and train.gradient_checkpointing:
        meter.checkpointed = handle.checkpointed_layers()  # their inputs are what is kept
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(train.grad_accum):
            batch = collate([data.examples[i] for i in next(batches)], pad, handle.device)
            with meter.forward() if meter is not None else contextlib.nullcontext():
                loss = model(**batch).loss
                losses.append(float(loss.detach()))
                if penalty is not None:
                    loss = loss + penalty()
            (loss / train.grad_accum).backward()
        if meter is not None:
            meter.after_backward(params)
        if after_backward is not None:
            after_backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        if meter is not None:
            meter.after_step(opt)
        if after_step is not None:
            after_step()
    opt.zero_grad(set_to_none=True)


def batch_stream(ins: TrainInstruction, data: ClientData) -> Iterator[list[int]]:
    """The round's shuffled batches, seeded by the instruction."""
    return _batches(len(data.examples), ins.train.batch_size, torch_generator(ins.seed, "batches"))


# an algorithm's hooks, called once the round's factors are loaded, before the first step:
# the penalty hook returns the term added to every micro-batch loss (None: no term this round);
# the report hook returns what to call after the last step for metrics to add to the reply
PenaltyHook = Callable[[ModelHandle, str, TrainInstruction], Callable[[], torch.Tensor] | None]
ReportHook = Callable[[ModelHandle, str, TrainInstruction], Callable[[], dict[str, float]]]


@dataclass
class RoundHooks:
    """What an algorithm adds to one round of the shared LoRA loop (all optional).

    Attributes
    ----------
    parts : str | None
        The factors to train (``None``: the instruction's ``parts``, which are also what
        travels back; FedSA-LoRA trains ``AB`` and sends ``A``).
    penalty : Callable[[], torch.Tensor] | None
        Added to every micro-batch loss.
    after_step : Callable[[], None] | None
        Runs after every optimizer step (SCAFFOLD's correction).
    finish : Callable[[], dict[str, float]] | None
        Runs after the last step, before the factors are read; its metrics join the reply.
    close : Callable[[], None] | None
        Runs when the round ends, also when it fails (removes what the hooks attached to the
        shared model, e.g. nested-rank masks).
    """

    parts: str | None = None
    penalty: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    finish: Callable[[], dict[str, float]] | None = None
    close: Callable[[], None] | None = None


# called once the round's factors are loaded, with the node's own state (None: the node has
# none, e.g. a caller outside a ClientApp); returns the round's hooks
BeginHook = Callable[[ModelHandle, str, TrainInstruction, NodeState | None], RoundHooks]
# the adapter a node evaluates as its own model: the global one plus its personal part
PersonalHook = Callable[[Adapter, NodeState | None], Adapter]


class LoraTrainer:
    """AdamW on the LoRA factors the instruction asks to train (``parts``).

    An algorithm's hooks, each called once the round's factors are loaded (so it can keep
    them): ``penalty`` returns the term added to every micro-batch loss (FedProx's proximal
    term, HetLoRA's tail norm), ``report`` returns a function called after the last step whose
    metrics join the reply (HetLoRA's ``prune_rank``). Both read the algorithm's per-client
    values from ``ins.options``.

    FLoRA's frozen global adapter (``ins.base``) is merged into the base weights for the
    round. An instruction with a pruning plan goes to
    :class:`~fedpeft.client.prune_trainer.PruneTrainer` (FedSpine's client half).
    """

    def __init__(
        self,
        penalty: PenaltyHook | None = None,
        report: ReportHook | None = None,
        begin: BeginHook | None = None,
        personal: PersonalHook | None = None,
    ) -> None:
        self.penalty = penalty
        self.report = report
        self.begin = begin
        self.personal = personal
        self.stateful = begin is not None or personal is not None

    def own_adapter(self, adapter: Adapter, node: NodeState | None) -> Adapter:
        """The adapter this node evaluates as its own model (``personal``'s, else ``adapter``)."""
        return adapter if self.personal is None else self.personal(adapter, node)

    def fit(
        self,
        handle: ModelHandle,
        ins: TrainInstruction,
        data: ClientData,
        node: NodeState | None = None,
    ) -> LoraUpdate:
        """Run the instruction's local steps and return the trained factors."""
        if ins.prune is not None:
            raise ProtocolError(
                "an instruction with a pruning plan needs a pruning client half "
                "(fedpeft.client.prune_trainer.PruneTrainer, FedSpine's), not LoraTrainer"
            )
        t0 = time.perf_counter()
        name = handle.ensure_adapter(ins.lora)
        handle.set_factors(name, ins.adapter)
        steps = local_steps(ins.train, len(data.examples))
        losses: list[float] = []
        with (
            scoped_torch_seed(derive_seed(ins.seed, "dropout")),
            handle.merged(ins.base),
            handle.training(name, ins.train.gradient_checkpointing),
        ):
            hooks = self.begin(handle, name, ins, node) if self.begin else RoundHooks()
            meter = MemoryMeter(handle.base_model, name, handle.device)
            try:
                penalty = self.penalty(handle, name, ins) if self.penalty is not None else None
                report = self.report(handle, name, ins) if self.report is not None else None
                run_steps(
                    handle, name, ins, data, batch_stream(ins, data), steps, losses,
                    penalty or hooks.penalty, after_step=hooks.after_step, parts=hooks.parts,
                    meter=meter,
                )  # fmt: skip
                metrics = {
                    "train_loss": sum(losses) / len(losses),
                    "steps": float(steps),
                    **meter.report(),
                }
                if hooks.finish is not None:
                    metrics.update(hooks.finish())
                if report is not None:
                    metrics.update(report())
            finally:
                if hooks.close is not None:
                    hooks.close()
        metrics["train_s"] = time.perf_counter() - t0
        return LoraUpdate(
            header=reply_header(ins, handle, data),
            factors=handle.get_factors(name),
            metrics=metrics,
        )


class NoopTrainer:
    """Returns the instruction's factors unchanged (measures framework overhead); with a
    pruning plan, at the structure it was sent (no pruning, no training)."""

    stateful = False

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Echo the global factors back."""
        plan = ins.prune
        return LoraUpdate(
            header=reply_header(ins, handle, data),
            factors=ins.adapter,
            metrics={"steps": 0.0},
            keep=plan.layout.encode(plan.start()) if plan is not None else None,
        )


def make_trainer(kind: str, algorithm: type[Any] | None = None) -> Trainer:
    """The trainer named by ``train.trainer`` (``noop``), else the algorithm's client half:
    its strategy class's ``trainer``, or the shared :class:`LoraTrainer`."""
    if kind == "noop":
        return NoopTrainer()
    own = getattr(algorithm, "trainer", None) if algorithm is not None else None
    return own if own is not None else LoraTrainer()
