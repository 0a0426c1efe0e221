"""Local trainers: turn a training instruction and local data into an update.

:class:`LoraTrainer` runs AdamW on the adapter only (the base model stays frozen), starting
each round from the global factors the instruction carries, with a fresh optimizer state (as
FedIT and FedAvg do). Data order and LoRA dropout come from the instruction's seed, so a
client round is reproducible on any backend. :class:`NoopTrainer` echoes the factors back
unchanged; benchmarks use it to measure the simulation's own overhead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from fedpeft.config import TrainConfig
from fedpeft.data.tokenize import Example, collate
from fedpeft.lora import ModelHandle
from fedpeft.seeding import derive_seed, scoped_torch_seed, torch_generator
from fedpeft.wire import Header, LoraUpdate, TrainInstruction

__all__ = ["ClientData", "LoraTrainer", "NoopTrainer", "Trainer", "local_steps", "make_trainer"]


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


def _reply_header(ins: TrainInstruction, handle: ModelHandle, data: ClientData) -> Header:
    return Header(
        run_id=ins.header.run_id,
        server_round=ins.header.server_round,
        model_fingerprint=handle.fingerprint,
        adapter_hash=ins.lora.config_hash(),
        num_examples=len(data.examples),
        client_id=data.client_id,
    )


class LoraTrainer:
    """AdamW on the LoRA factors of the shared base model."""

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Run the instruction's local steps and return the trained factors."""
        t0 = time.perf_counter()
        train = ins.train
        name = handle.ensure_adapter(ins.lora)
        handle.set_factors(name, ins.adapter)
        params = handle.trainable_parameters(name)
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        steps = local_steps(train, len(data.examples))
        batches = _batches(
            len(data.examples), train.batch_size, torch_generator(ins.seed, "batches")
        )
        pad = handle.tokenizer.pad_token_id
        losses: list[float] = []
        with scoped_torch_seed(derive_seed(ins.seed, "dropout")), handle.training(name) as model:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                for _ in range(train.grad_accum):
                    batch = collate([data.examples[i] for i in next(batches)], pad, handle.device)
                    loss = model(**batch).loss
                    (loss / train.grad_accum).backward()
                    losses.append(float(loss.detach()))
                if train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                opt.step()
        opt.zero_grad(set_to_none=True)
        return LoraUpdate(
            header=_reply_header(ins, handle, data),
            factors=handle.get_factors(name),
            metrics={
                "train_loss": sum(losses) / len(losses),
                "steps": float(steps),
                "train_s": time.perf_counter() - t0,
            },
        )


class NoopTrainer:
    """Returns the instruction's factors unchanged (measures framework overhead)."""

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Echo the global factors back."""
        return LoraUpdate(
            header=_reply_header(ins, handle, data), factors=ins.adapter, metrics={"steps": 0.0}
        )


def make_trainer(kind: str) -> Trainer:
    """The trainer named by ``train.trainer``."""
    return NoopTrainer() if kind == "noop" else LoraTrainer()
