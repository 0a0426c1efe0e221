"""Check a client's update against the instruction it was sent, before aggregation.

A bad update is rejected alone, with a reason naming the field and the values; the round
goes on with the others. Checked: the header (protocol, run id, round, base-model fingerprint,
adapter-config hash, client id, num_examples), the module set, every factor's shape and rank,
alpha, dtype and that all values are finite.
"""

from __future__ import annotations

import torch

from fedpeft.errors import ProtocolError
from fedpeft.wire import LoraUpdate, TrainInstruction

__all__ = ["validate_update"]

MAX_NUM_EXAMPLES = 10**9


def _check_header(update: LoraUpdate, ins: TrainInstruction) -> None:
    got, want = update.header, ins.header
    for name in ("run_id", "server_round", "model_fingerprint", "client_id"):
        if getattr(got, name) != getattr(want, name):
            raise ProtocolError(
                f"header {name} is {getattr(got, name)!r}, expected {getattr(want, name)!r}"
            )
    if got.adapter_hash != ins.lora.config_hash():
        raise ProtocolError(
            f"header adapter_hash is {got.adapter_hash!r}, expected {ins.lora.config_hash()!r} "
            f"(rank {ins.lora.rank}, alpha {ins.lora.alpha})"
        )
    if not 1 <= got.num_examples <= MAX_NUM_EXAMPLES:
        raise ProtocolError(f"num_examples is {got.num_examples}, expected 1..{MAX_NUM_EXAMPLES}")


def validate_update(update: LoraUpdate, ins: TrainInstruction) -> None:
    """Raise ``ProtocolError`` with the first problem found, or return ``None``.

    Parameters
    ----------
    update : LoraUpdate
        What the client sent.
    ins : TrainInstruction
        What the client was asked to do.
    """
    _check_header(update, ins)
    if set(update.factors) != set(ins.adapter):
        missing = sorted(set(ins.adapter) - set(update.factors))[:3]
        extra = sorted(set(update.factors) - set(ins.adapter))[:3]
        raise ProtocolError(
            f"adapter modules differ from the instruction: missing {missing}, extra {extra}"
        )
    r = ins.lora.rank
    for m, f in update.factors.items():
        ref = ins.adapter[m]
        want_a, want_b = (r, ref.a.shape[1]), (ref.b.shape[0], r)
        if tuple(f.a.shape) != want_a or tuple(f.b.shape) != want_b:
            raise ProtocolError(
                f"{m}: got A{tuple(f.a.shape)} B{tuple(f.b.shape)}, "
                f"expected A{want_a} B{want_b} (rank {r})"
            )
        if f.alpha != ins.lora.alpha:
            raise ProtocolError(f"{m}: alpha {f.alpha}, expected {ins.lora.alpha}")
        for part, t in (("A", f.a), ("B", f.b)):
            if not t.is_floating_point():
                raise ProtocolError(f"{m}::{part} has dtype {t.dtype}, expected a floating dtype")
            if not bool(torch.isfinite(t).all()):
                raise ProtocolError(f"{m}::{part} contains NaN or infinite values")
