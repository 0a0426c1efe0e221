"""The start and the end of a run: initial global model, strategy context, saving the result.

LoRA strategies start from the run's deterministic initial adapter (``B = 0``) and save the
final adapter in peft format (``adapter/``). Seed/scalar strategies start from the base model
(or that initial adapter for ``zo.target = "lora"``) with all coefficients zero and save
``zo_state.safetensors``: the (blocks x K) coefficient matrix plus the spec in its metadata,
which with the base model is the whole trained model (``theta_0 - sum coeffs z``); for the
LoRA target the materialised adapter is saved in peft format too.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import AggregateResult, StrategyContext, ZoGlobal
from fedpeft.algorithms.registry import strategy_capabilities
from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.lora.handle import ModelHandle, init_factors
from fedpeft.lora.ranks import make_rank_policy
from fedpeft.prune.layout import PruneLayout
from fedpeft.rounds import round_train
from fedpeft.seeding import derive_seed
from fedpeft.wire.messages import LoraSpec
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.runtime import DirectionMask, get_runtime, mask_id
from fedpeft.zo.trainer import direction_mask

__all__ = ["initial_global", "save_global", "spec_of", "zo_spec_of"]


def spec_of(cfg: RunConfig) -> LoraSpec:
    """The run's adapter structure from ``[lora]``."""
    return LoraSpec(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        target_modules=tuple(cfg.lora.target_modules),
        dropout=cfg.lora.dropout,
    )


def zo_spec_of(
    cfg: RunConfig, algorithm: str, clients_per_round: int = 1, mask: DirectionMask | None = None
) -> ZoSpec:
    """The seed/scalar spec from ``[zo]``; the pool seed derives from the run seed
    (``algorithm``: the local loop; ``mask``: the variant's direction mask).

    In centralized mode FedKSeed's single client runs ``clients_per_round`` times the local
    steps, the same number of steps as the federated run it is the reference for.
    """
    z = cfg.zo
    sync = (
        z.sync
        if z.sync != "auto"
        else ("full" if cfg.simulation.backend == "ray" else "incremental")
    )
    steps = z.local_steps * (clients_per_round if cfg.federation.centralized else 1)
    return ZoSpec(
        algorithm=algorithm,
        target=z.target,
        num_seeds=z.num_seeds,
        pool_seed=derive_seed(cfg.federation.seed, "zo-pool"),
        dist=z.dist,
        eps=z.eps,
        lr=z.lr,
        local_steps=steps,
        keep_z=z.keep_z,
        master=z.master,
        scalar_dtype=z.scalar_dtype,
        block_numel=z.block_numel,
        directions=z.directions,
        sync=sync,
        mask=mask_id(mask),
        lora=spec_of(cfg) if z.target == "lora" else None,
    )


def initial_global(
    cfg: RunConfig,
    handle: ModelHandle,
    strategy_cls: type[Any],
    clients_per_round: int,
    cache: ProcessCache = PROCESS_CACHE,
) -> tuple[AggregateResult, StrategyContext]:
    """The round-0 global model and the context the strategy is built with."""
    seed, spec = cfg.federation.seed, spec_of(cfg)
    caps = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
    if caps.family == "zo":
        mask = direction_mask(strategy_cls)
        zspec = zo_spec_of(cfg, strategy_cls.zo_algorithm, clients_per_round, mask)
        rt = get_runtime(handle, zspec, cache, mask)
        zeros = np.zeros((rt.num_blocks, zspec.num_seeds), np.float32)
        ctx = StrategyContext(initial={}, spec=spec, seed=seed, zo=zspec, zo_blocks=rt.num_blocks)
        return AggregateResult(zo=ZoGlobal(zspec, 0, zeros)), ctx
    layout = PruneLayout.of(handle.base_model) if caps.needs_layout else None
    adapter = init_factors(handle.module_shapes(handle.ensure_adapter(spec)), spec, seed)
    ctx = StrategyContext(
        adapter, spec, seed, ranks=make_rank_policy(cfg), layout=layout,
        train=partial(round_train, cfg), num_clients=cfg.federation.num_clients,
    )  # fmt: skip
    return AggregateResult(adapter=adapter, spec=spec), ctx


def save_global(
    model: AggregateResult,
    handle: ModelHandle,
    out_dir: Path,
    cache: ProcessCache = PROCESS_CACHE,
    mask: DirectionMask | None = None,
) -> str:
    """Write the final global model under ``out_dir``; returns what to load it from
    (``mask``: a seed/scalar variant's direction mask)."""
    if model.zo is None:
        if model.spec is None or model.adapter is None:
            raise ValueError("nothing to save: the global model is empty")
        return str(handle.save_adapter(model.spec, model.adapter, out_dir / "adapter"))
    from safetensors.torch import save_file

    zo = model.zo
    meta = {
        "spec": json.dumps(dataclasses.asdict(zo.spec), default=str),
        "version": str(zo.version),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "zo_state.safetensors"
    save_file(
        {"coeffs": torch.from_numpy(np.ascontiguousarray(zo.coeffs))}, str(path), metadata=meta
    )
    if zo.spec.target == "lora" and zo.spec.lora is not None:
        rt = get_runtime(handle, zo.spec, cache, mask)
        rt.set_global(zo.coeffs, zo.version)
        name = handle.ensure_adapter(zo.spec.lora)
        return str(handle.save_adapter(zo.spec.lora, handle.get_factors(name), out_dir / "adapter"))
    return str(path)
