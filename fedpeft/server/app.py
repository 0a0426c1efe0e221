"""The coordinator: a Flower ``ServerApp`` that runs fedpeft rounds on whatever ``Grid`` it gets.

``make_server_app(cfg, out_dir)`` builds the app for a scenario. Its ``main`` loads the base
model once (for the adapter shapes, the fingerprint and centralized evaluation), sets up the
initial global model from the run seed, builds the strategy, runs the
:class:`~fedpeft.server.coordinator.Coordinator` and writes ``metrics.jsonl``,
``summary.json`` and the final model (a peft adapter in ``out_dir/adapter``; for seed/scalar
strategies also ``zo_state.safetensors``), ``base_model.json`` (what the base truly was,
:mod:`fedpeft.base_card`) and ``predictions.jsonl`` (a few held-out examples answered before and
after training, when the run computes a generation metric).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.algorithms.base import AggregateResult, Strategy, StrategyContext
from fedpeft.algorithms.registry import build_strategy, resolve, strategy_capabilities
from fedpeft.algorithms.wrappers.dp import DpAggregation
from fedpeft.algorithms.wrappers.robust import RobustAggregation
from fedpeft.algorithms.wrappers.server_opt import ServerOptimizer
from fedpeft.base_card import base_record, write_base_card
from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.config.load import config_hash
from fedpeft.data.clients import get_task
from fedpeft.evaluation import EvalSet, Evaluator
from fedpeft.lora.handle import ModelHandle
from fedpeft.models import get_model
from fedpeft.prune.deployed import device_evaluator
from fedpeft.prune.magnitude import magnitude_scores, regrow
from fedpeft.prune.schedule import default_protect, shrink, target_counts
from fedpeft.server.checkpoint import CHECKPOINT
from fedpeft.server.coordinator import Coordinator, SimulatedNodes, clients_per_round, new_run_id
from fedpeft.server.results import RunReporter, summarize
from fedpeft.server.start import initial_global, save_global
from fedpeft.zo.trainer import direction_mask

__all__ = ["PREDICTIONS", "Outcome", "make_server_app", "run_server", "run_strategy"]

#: A few held-out examples' generations before and after training, in the run folder.
PREDICTIONS = "predictions.jsonl"


@dataclass
class Outcome:
    """Filled in by the server app: the summary, or the exception that ended the run."""

    summary: dict[str, Any] | None = None
    error: BaseException | None = None
    model: AggregateResult | None = None  # the final global model
    extra: dict[str, Any] = field(default_factory=dict)


def run_server(
    grid: Grid,
    cfg: RunConfig,
    out_dir: Path,
    reporter: RunReporter,
    cache: ProcessCache = PROCESS_CACHE,
    resume: bool = False,
    outcome: Outcome | None = None,
    nodes: SimulatedNodes | None = None,
) -> dict[str, Any]:
    """Run the whole federated job on ``grid``; returns the summary (and records the final
    global model in ``outcome.model`` when given).

    The coordinator's state is checkpointed to ``out_dir/checkpoint.safetensors`` after every
    round; ``resume`` continues from there.

    Raises
    ------
    RoundError
        If a round cannot complete (too few valid updates).
    CheckpointError
        If ``resume`` finds no checkpoint, or one of another scenario.
    """
    t0 = time.perf_counter()
    reporter.on_phase("loading the base model")
    handle = get_model(cfg.model, cache)
    cls = resolve(cfg.strategy.name)
    strategy, initial, ctx = run_strategy(cfg, handle, cache)
    caps = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
    held_out = get_task(cfg.data, cfg.federation.seed, cache).eval
    evalset = EvalSet.build(cfg, held_out, handle.tokenizer)
    devices = device_evaluator(cfg, handle, evalset, cache) if caps.needs_layout else None
    evaluator = Evaluator(cfg, handle, evalset, cache, direction_mask(cls))
    coordinator = Coordinator(
        cfg,
        grid,
        strategy,
        initial,
        fingerprint=handle.fingerprint,
        run_id=new_run_id(config_hash(cfg)),
        evaluate=evaluator.global_model,
        on_row=reporter.on_row,
        zo_blocks=ctx.zo_blocks,
        checkpoint=out_dir / CHECKPOINT,
        resume=resume,
        nodes=nodes,
        evaluate_devices=devices,
        on_phase=reporter.on_phase,
    )
    result = coordinator.run()
    if outcome is not None:
        outcome.model = result.model
    saved = save_global(result.model, handle, out_dir, cache, direction_mask(cls))
    adapter = out_dir / "adapter"
    if rows := evaluator.predictions(before=not resume):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / PREDICTIONS).write_text(text, encoding="utf-8")
    write_base_card(out_dir, base_record(cfg.model, handle), adapter if adapter.is_dir() else None)
    result.wall_s = time.perf_counter() - t0
    summary = summarize(cfg, result, saved)
    reporter.finish(summary, cfg.data.metric)
    return summary


def run_strategy(
    cfg: RunConfig, handle: ModelHandle, cache: ProcessCache = PROCESS_CACHE
) -> tuple[Strategy, AggregateResult, StrategyContext]:
    """The run's strategy as its coordinator runs it (with validation records when it needs
    them, wrapped in the server optimizer, robust rules and DP the scenario asks for), the
    initial global model and the strategy's context."""
    seed = cfg.federation.seed
    cls = resolve(cfg.strategy.name)
    per_round = clients_per_round(cfg, cfg.federation.num_clients)
    initial, ctx = initial_global(cfg, handle, cls, per_round, cache)
    held_out = get_task(cfg.data, seed, cache).eval
    caps = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
    if caps.needs_validation and cfg.eval.validation_examples > 0:
        valset = EvalSet.build(cfg, held_out, handle.tokenizer, part="validation")
        if valset.examples:
            validator = Evaluator(cfg, handle, valset, cache)
            ctx = replace(ctx, validation_loss=lambda s, a: validator(s, a, False)["eval_loss"])
    if caps.needs_layout and ctx.layout is not None:
        layout = ctx.layout
        protect = default_protect(layout)
        scores = functools.cache(lambda: magnitude_scores(handle.base_model, layout))

        @functools.cache
        def start(ratio: float, keep: bytes = b"") -> bytes:
            if keep:  # a pruned device moving to a less pruned arm: grow its structure back
                return layout.encode(regrow(layout, layout.decode(keep), scores(), ratio, protect))
            counts = target_counts(layout, ratio, protect)
            return layout.encode(shrink(layout.full(), scores(), counts))

        ctx = replace(ctx, magnitude_start=start)
    strategy = build_strategy(cfg.strategy.name, cfg.strategy.options, ctx)
    zo = caps.family == "zo"
    if cfg.server_opt.active:
        strategy = ServerOptimizer(strategy, cfg.server_opt, caps.example_weighted)
    if cfg.robust.active:
        strategy = RobustAggregation(strategy, cfg.robust, zo=zo)
    if cfg.dp.active:
        shape = (ctx.zo_blocks, ctx.zo.num_seeds if ctx.zo is not None else 1)
        n = cfg.federation.num_clients
        strategy = DpAggregation(
            strategy, cfg.dp, per_round, n, seed, zo=zo, zo_shape=shape,
            distributed=cfg.secagg.enabled,
        )  # fmt: skip
    return strategy, initial, ctx


def make_server_app(
    cfg: RunConfig,
    out_dir: Path,
    reporter: RunReporter,
    outcome: Outcome,
    cache: ProcessCache = PROCESS_CACHE,
    resume: bool = False,
    wrap_grid: Callable[[Grid], Grid] | None = None,
    nodes: SimulatedNodes | None = None,
) -> ServerApp:
    """A ``ServerApp`` whose ``main`` runs :func:`run_server` and records the outcome.

    ``wrap_grid`` wraps the grid Flower hands the app (the simulation's attackers).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if wrap_grid is not None:
            grid = wrap_grid(grid)
        try:
            outcome.summary = run_server(
                grid, cfg, out_dir, reporter, cache, resume, outcome, nodes
            )
        except BaseException as err:
            outcome.error = err
            reporter.bar.close()
            raise

    return app
