"""The client side of seed/scalar training: sync, train locally, report (seed, scalar) pairs.

A round on a client: bring the process's :class:`~fedpeft.zo.runtime.ZoRuntime` to the
instructed version (regenerating only the directions whose coefficients changed; counted as
``sync_regens``, in units of full-model regenerations), run the algorithm's local training
(:func:`~fedpeft.zo.local.fedkseed_local` or :func:`~fedpeft.zo.local.ferret_local`) from that
point, restore the synced weights, and return the indices and scalars.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.client.trainer import ClientData, local_steps
from fedpeft.data.tokenize import collate
from fedpeft.lora import ModelHandle
from fedpeft.wire import Header
from fedpeft.wire_zo import ZoInstruction, ZoUpdate, index_dtype
from fedpeft.zo.local import fedkseed_local, ferret_local
from fedpeft.zo.runtime import get_runtime

__all__ = ["fit_zo"]


def fit_zo(
    handle: ModelHandle, ins: ZoInstruction, data: ClientData, cache: ProcessCache = PROCESS_CACHE
) -> ZoUpdate:
    """Run one seed/scalar round on this client and build its update."""
    t0 = time.perf_counter()
    spec, train, n = ins.spec, ins.train, len(data.examples)
    rt = get_runtime(handle, spec, cache)
    sync_regens = rt.sync(ins.sync)
    pad = handle.tokenizer.pad_token_id

    def batch_of(idx: list[int]) -> dict[str, torch.Tensor]:
        return collate([data.examples[i] for i in idx], pad, handle.device)

    if spec.algorithm == "fedkseed":
        res = fedkseed_local(rt, spec, batch_of, n, train.batch_size, ins.seed, ins.probs)
        blocks = np.zeros(0, np.uint16)
    else:
        budget = spec.directions or spec.num_seeds
        steps = local_steps(train, n)
        res = ferret_local(
            rt,
            spec,
            batch_of,
            n,
            train.lr,
            steps,
            train.batch_size,
            train.grad_accum,
            budget,
            ins.seed,
        )
        blocks = res.blocks.astype(index_dtype(rt.num_blocks))
    header = Header(
        run_id=ins.header.run_id,
        server_round=ins.header.server_round,
        model_fingerprint=handle.fingerprint,
        adapter_hash=spec.config_hash(),
        num_examples=n,
        client_id=data.client_id,
    )
    metrics = {**res.metrics, "sync_regens": sync_regens, "train_s": time.perf_counter() - t0}
    return ZoUpdate(
        header=header,
        seeds=res.seeds.astype(index_dtype(spec.num_seeds)),
        scalars=res.scalars.astype(spec.scalar_dtype),
        blocks=blocks,
        synced_version=rt.version,
        metrics=metrics,
    )
