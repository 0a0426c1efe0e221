"""The client half of seed/scalar algorithms: sync, train locally, report (seed, scalar) pairs.

A round on a client: bring the process's :class:`~fedpeft.zo.runtime.ZoRuntime` to the
instructed version (regenerating only the directions whose coefficients changed; counted as
``sync_regens``, in units of full-model regenerations), run the local loop the spec names
(:data:`LOOPS`: FedKSeed's two-point steps or Ferret's projected first-order steps) from that
point, restore the synced weights, and return the indices and scalars.

A seed/scalar algorithm's strategy class carries its client half as ``trainer =
ZoTrainer(...)``; a variant hooks the shared loops there instead of writing one: ``mask`` (a
:class:`~fedpeft.zo.runtime.DirectionMask`) restricts every direction the runtime hands out,
on the clients and on the coordinator (Sparse MeZO's masked perturbations; see
``docs/architecture.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.client.memory import MemoryMeter
from fedpeft.client.trainer import ClientData, local_steps
from fedpeft.data.tokenize import collate
from fedpeft.errors import ProtocolError
from fedpeft.lora.handle import ModelHandle
from fedpeft.wire.messages import Header
from fedpeft.wire.zo import ZoInstruction, ZoUpdate, index_dtype
from fedpeft.zo.local import LocalResult, fedkseed_local, ferret_local
from fedpeft.zo.runtime import DirectionMask, ZoRuntime, get_runtime

__all__ = ["LOOPS", "ZoTrainer", "direction_mask", "zo_trainer_of"]

Batches = Callable[[list[int]], dict[str, torch.Tensor]]


def _two_point(
    rt: ZoRuntime, ins: ZoInstruction, batch_of: Batches, n: int, meter: MemoryMeter
) -> LocalResult:
    # forward passes only, under no_grad: nothing is saved for a backward, no optimizer state
    return fedkseed_local(rt, ins.spec, batch_of, n, ins.train.batch_size, ins.seed, ins.probs)


def _projected(
    rt: ZoRuntime, ins: ZoInstruction, batch_of: Batches, n: int, meter: MemoryMeter
) -> LocalResult:
    spec, train = ins.spec, ins.train
    budget = spec.directions or spec.num_seeds
    steps = local_steps(train, n)
    return ferret_local(
        rt, spec, batch_of, n, train.lr, steps, train.batch_size, train.grad_accum, budget,
        ins.seed, meter,
    )  # fmt: skip


Loop = Callable[[ZoRuntime, ZoInstruction, Batches, int, MemoryMeter], LocalResult]
# the local loop each ``ZoSpec.algorithm`` names
LOOPS: dict[str, Loop] = {
    "fedkseed": _two_point,
    "ferret": _projected,
}


@dataclass(frozen=True)
class ZoTrainer:
    """The shared seed/scalar client loop, with the variant's hooks.

    Attributes
    ----------
    mask : DirectionMask | None
        Restricts every direction (local steps, projections, syncs, the coordinator's
        replay) to the coordinates it marks; ``None``: whole tensors.
    """

    mask: DirectionMask | None = None

    def fit(
        self,
        handle: ModelHandle,
        ins: ZoInstruction,
        data: ClientData,
        cache: ProcessCache = PROCESS_CACHE,
    ) -> ZoUpdate:
        """Run one seed/scalar round on this client and build its update."""
        t0 = time.perf_counter()
        spec, n = ins.spec, len(data.examples)
        loop = LOOPS.get(spec.algorithm)
        if loop is None:
            raise ProtocolError(
                f"zo spec names local loop {spec.algorithm!r}; this node runs {sorted(LOOPS)}"
            )
        rt = get_runtime(handle, spec, cache, self.mask)
        sync_regens = rt.sync(ins.sync)
        pad = handle.tokenizer.pad_token_id

        def batch_of(idx: list[int]) -> dict[str, torch.Tensor]:
            return collate([data.examples[i] for i in idx], pad, handle.device)

        meter = MemoryMeter(handle.base_model, rt.adapter, handle.device)
        meter.hold(rt.state_tensors())  # the synced snapshot that restores exactly, masks
        res = loop(rt, ins, batch_of, n, meter)
        blocks = res.blocks.astype(index_dtype(rt.num_blocks))
        header = Header(
            run_id=ins.header.run_id,
            server_round=ins.header.server_round,
            model_fingerprint=handle.fingerprint,
            adapter_hash=spec.config_hash(),
            num_examples=n,
            client_id=data.client_id,
        )
        metrics = {
            **res.metrics,
            **meter.report(),
            "sync_regens": sync_regens,
            "train_s": time.perf_counter() - t0,
        }
        return ZoUpdate(
            header=header,
            seeds=res.seeds.astype(index_dtype(spec.num_seeds)),
            scalars=res.scalars.astype(spec.scalar_dtype),
            blocks=blocks,
            synced_version=rt.version,
            metrics=metrics,
        )


def zo_trainer_of(algorithm: type[Any]) -> ZoTrainer:
    """A seed/scalar algorithm's client half: its ``trainer``, or the plain shared loop.

    Raises
    ------
    ProtocolError
        If its ``trainer`` is not a :class:`ZoTrainer` (a LoRA client half, say).
    """
    trainer = getattr(algorithm, "trainer", None)
    if trainer is None:
        return ZoTrainer()
    if not isinstance(trainer, ZoTrainer):
        raise ProtocolError(
            f"{algorithm.__name__} is a seed/scalar algorithm but its trainer {trainer!r} is "
            "not a fedpeft.zo.trainer.ZoTrainer"
        )
    return trainer


def direction_mask(algorithm: type[Any]) -> DirectionMask | None:
    """The direction mask of a seed/scalar algorithm class (its ``trainer``'s), or None."""
    trainer = getattr(algorithm, "trainer", None)
    return trainer.mask if isinstance(trainer, ZoTrainer) else None
