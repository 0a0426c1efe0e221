"""The LoRA-factor family: instructions carry factors, replies carry trained factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from fedpeft.changes import combined_update, flat_change, shared_sent, trained_mask
from fedpeft.families.base import FlatLayout, Stamp
from fedpeft.server.validate import MB, Limits, validate_secure_reply, validate_update
from fedpeft.wire.messages import (
    LoraUpdate,
    SharedRecords,
    TrainInstruction,
    decode_update,
    encode_instruction,
    instruction_payload,
    update_payload,
)

__all__ = ["LORA", "LoraFamily"]


class LoraFamily:
    """LoRA factors (``train.lora``: :class:`TrainInstruction` -> :class:`LoraUpdate`)."""

    name = "lora"

    def instruction(self, plan: Any, stamp: Stamp) -> TrainInstruction:
        """A :class:`TrainInstruction` from a ``LoraPlan``."""
        return TrainInstruction(
            stamp.header, plan.spec, stamp.train, plan.adapter, stamp.seed,
            parts=plan.parts, base=plan.base, compress=stamp.compress,
            prune=plan.prune,
            secure=stamp.secure, dp_clip=stamp.dp_clip, dp_noise=stamp.dp_noise,
            options=dict(plan.options), aux=plan.aux, strategy=stamp.strategy,
        )  # fmt: skip

    def encode(self, ins: TrainInstruction, shared: SharedRecords) -> RecordDict:
        """Encoded with the instruction's download codec; broadcasts shared."""
        return encode_instruction(ins, shared)

    def payload_down(self, ins: TrainInstruction, content: RecordDict) -> int:
        """The bytes of the encoded adapter arrays."""
        return instruction_payload(content)

    def auto_reply_limit(self, ins: TrainInstruction, limits: Limits) -> int:
        """1 MB + twice the float32 factors sent."""
        numel = sum(f.a.numel() + f.b.numel() for f in ins.adapter.values())
        return MB + 2 * 4 * numel

    def decode(
        self, content: RecordDict, ins: TrainInstruction, limits: Limits
    ) -> tuple[LoraUpdate, int]:
        """Decoded against the sent factors and validated; a secure reply carries no tensors
        (its factors travel only inside the secure sum; the sent ones stand in)."""
        if ins.secure:
            update = decode_update(content)
            validate_secure_reply(update, ins, limits)
            return replace(update, factors=dict(ins.adapter)), 0
        update = decode_update(content, reference=ins.adapter)
        validate_update(update, ins, limits)
        return update, update_payload(content)

    def choices(self, ins: TrainInstruction) -> dict[str, float]:
        """Its LoRA rank, and its pruning ratio when it prunes."""
        out = {"rank": float(ins.lora.rank)}
        if ins.prune is not None:
            out["prune"] = float(ins.prune.ratio)
        return out

    def flat(
        self,
        instructions: Mapping[str, Any],
        cids: Sequence[str],
        zo_blocks: int,
        scalar_clip: float = 0.0,
    ) -> FlatLayout:
        """The trained coordinates of the factors every client was sent (linear strategies);
        rebuilt as ONE update: the sent factors plus the mean change, with the total count
        (``zo_blocks``, ``scalar_clip``: seed/scalar only)."""
        sent = shared_sent(
            {c: i.adapter for c, i in instructions.items()},
            cids,
            "secure aggregation sums changes of clients sent the same factors (use fedavg or ffa)",
        )
        trained = trained_mask(sent, instructions[cids[0]].parts)

        def rebuild(kept: list[Any], total: np.ndarray, denominator: float) -> list[Any]:
            change = torch.zeros(trained.shape, dtype=torch.float64)
            change[trained] = torch.from_numpy(total / denominator)
            examples = sum(u.header.num_examples for u in kept)
            return [combined_update(kept[0], sent, change, examples, len(kept))]

        def vector(update: LoraUpdate) -> np.ndarray:
            return flat_change(update.factors, sent)[trained].numpy()  # the trained coordinates

        def stub(update: LoraUpdate) -> LoraUpdate:
            return replace(update, factors=dict(sent))  # the sent factors stand in, as secure

        return FlatLayout(int(trained.sum()), rebuild, vector, stub)


LORA = LoraFamily()
