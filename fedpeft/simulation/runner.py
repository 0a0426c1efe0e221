"""``fedpeft simulate``: run a scenario with the in-process grid or Flower's Ray engine.

Both backends run the very same ``ServerApp`` and ``ClientApp``:

- ``inprocess`` (default): :class:`~fedpeft.simulation.inprocess.InProcessGrid`; clients run
  one after another in this process and share one base model.
- ``ray``: ``flwr.simulation.run_simulation`` (Flower's Simulation Engine; one model per Ray
  worker process). ``simulation.ray_address`` joins an existing Ray cluster;
  ``ray_num_cpus`` / ``ray_num_gpus`` are the resources of each virtual client (fractional
  GPUs let several clients share one GPU).

Writes ``OUT/config.toml`` (the resolved configuration), ``OUT/metrics.jsonl``,
``OUT/summary.json``, ``OUT/adapter/`` and, after every round, ``OUT/checkpoint.safetensors``
(``resume=True`` continues a run from it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.client.app import make_client_app
from fedpeft.config import RunConfig
from fedpeft.config.load import combination_problems, config_to_dict, dump_toml
from fedpeft.data.check import check_data
from fedpeft.data.inspect import inspect_split
from fedpeft.errors import ConfigError, FedpeftError
from fedpeft.server.app import Outcome, make_server_app
from fedpeft.server.results import RunReporter
from fedpeft.simulation.attacks import AttackGrid
from fedpeft.simulation.inprocess import InProcessGrid, PartitionConfigs
from fedpeft.zo.runtime import discard_changed_models

__all__ = ["SPLIT", "num_nodes", "simulate"]

#: How the data was split among the clients (:mod:`fedpeft.data.inspect`), in the run folder.
SPLIT = "split.json"


def num_nodes(cfg: RunConfig) -> int:
    """Virtual nodes to start: one in centralized mode, else ``federation.num_clients``."""
    return cfg.federation.nodes


class _NotOurs(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated (the Ray engine is reached
    through it; nothing for a user to change) and its DEBUG chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return record.levelno > logging.DEBUG and "`run_simulation` function" not in text


def _ray(server_app: Any, client_app: Any, cfg: RunConfig, quiet: bool) -> None:
    from flwr.simulation import run_simulation

    sim = cfg.simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    flwr_log = logging.getLogger("flwr")
    level, quiet_filter = flwr_log.level, _NotOurs()
    flwr_log.addFilter(quiet_filter)
    # Ray's workers are processes of their own: they read Flower's level from the environment
    # they inherit, and their log lines reach this console through Ray (an actor's
    # "Manually terminating" warning at shutdown, for one).
    worker_level = os.environ.get("FLWR_LOG_LEVEL")
    if quiet:
        flwr_log.setLevel(logging.ERROR)  # errors still shown
        os.environ["FLWR_LOG_LEVEL"] = "ERROR"
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_nodes(cfg),
            backend_config={
                "client_resources": {
                    "num_cpus": sim.ray_num_cpus, "num_gpus": sim.ray_num_gpus
                },
                "init_args": init_args,
            },
        )  # fmt: skip
    finally:
        flwr_log.removeFilter(quiet_filter)
        flwr_log.setLevel(level)
        if worker_level is None:
            os.environ.pop("FLWR_LOG_LEVEL", None)
        else:
            os.environ["FLWR_LOG_LEVEL"] = worker_level


def simulate(
    cfg: RunConfig,
    out_dir: str | Path,
    backend: str | None = None,
    quiet: bool = False,
    cache: ProcessCache = PROCESS_CACHE,
    resume: bool = False,
    tensorboard: bool = False,
    outcome: Outcome | None = None,
) -> dict[str, Any]:
    """Run a scenario to the end and return its summary.

    Parameters
    ----------
    cfg : RunConfig
        The validated scenario.
    out_dir : str | Path
        Run folder (created; earlier metrics there are replaced).
    backend : str | None
        ``inprocess`` or ``ray``; ``None`` uses ``simulation.backend``.
    quiet : bool
        No progress bar or table.
    cache : ProcessCache
        Where models and data are shared (in-process backend).
    resume : bool
        Continue the run in ``out_dir`` from its checkpoint (its last completed round).
    tensorboard : bool
        Also write every round's numeric metrics as TensorBoard scalars (``out_dir/tensorboard``).
    outcome : Outcome | None
        Filled in with the summary and the final global model (the Python API reads it).

    Returns
    -------
    dict[str, Any]
        The contents of ``summary.json``.
    """
    backend = backend or cfg.simulation.backend
    if backend not in ("inprocess", "ray"):
        raise FedpeftError(f"unknown backend {backend!r}; use inprocess or ray")
    if backend != cfg.simulation.backend:  # the rules see the backend that will run
        cfg = replace(cfg, simulation=replace(cfg.simulation, backend=backend))
        if problems := combination_problems(cfg):
            raise ConfigError(problems)
    check_data(cfg, cache)  # before any model loads or any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(dump_toml(config_to_dict(cfg)), encoding="utf-8")
    split = json.dumps(inspect_split(cfg, cache), indent=1)
    (out / SPLIT).write_text(split + "\n", encoding="utf-8")
    reporter = RunReporter(
        out, cfg.federation.rounds, quiet=quiet, tensorboard=tensorboard, resume=resume
    )
    outcome = outcome if outcome is not None else Outcome()
    attack = (lambda grid: AttackGrid(grid, cfg)) if cfg.attack.kind != "none" else None
    client_app = make_client_app(cfg, cache)
    n = num_nodes(cfg)
    try:
        if backend == "inprocess":
            grid = InProcessGrid(
                client_app,
                PartitionConfigs(n),
                serialize=cfg.simulation.serialize,
                on_reply=reporter.on_reply,
            )
            server_app = make_server_app(
                cfg, out, reporter, outcome, cache, resume, wrap_grid=attack, nodes=grid
            )
            ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
            server_app(grid, ctx)
        else:
            server_app = make_server_app(cfg, out, reporter, outcome, cache, resume, attack)
            _ray(server_app, client_app, cfg, quiet)
    finally:
        discard_changed_models(cache)  # the next run in this process gets the true base
    if outcome.error is not None:
        raise outcome.error
    if outcome.summary is None:
        raise FedpeftError(f"the {backend} simulation ended without a result; see the log above")
    return outcome.summary
