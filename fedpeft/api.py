"""The Python API: run a scenario from a notebook or a script and get its results back.

``fedpeft.simulate(config_or_path, *, overrides=None, model=None, data=None, out_dir=None,
progress=True)`` runs the same coordinator and clients as ``fedpeft simulate`` and returns a
:class:`SimulationResult` (per-round rows, summary, the final global adapter or seed/scalar
coefficients). Each call has its own process cache: models and data built for one call are
never seen by another, and a model object passed in is copied, never changed. Nothing here
writes environment variables (the ``fedpeft`` command sets its own; see
:data:`fedpeft.cli.APP_ENVIRONMENT`).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.algorithms.registry import resolve
from fedpeft.cache import ProcessCache
from fedpeft.config import RunConfig
from fedpeft.config.load import config_to_dict, dump_toml, load_config
from fedpeft.data.clients import task_key
from fedpeft.data.tasks import split_records
from fedpeft.errors import ConfigError
from fedpeft.models import get_model, handle_of, model_key
from fedpeft.server.app import Outcome
from fedpeft.simulation.runner import simulate as run_scenario
from fedpeft.wire.messages import Adapter, LoraSpec
from fedpeft.zo.runtime import get_runtime
from fedpeft.zo.trainer import direction_mask

__all__ = ["SimulationResult", "simulate"]


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation produced.

    Attributes
    ----------
    config : RunConfig
        The scenario as run (overrides applied).
    rows : list[dict[str, Any]]
        One row per round (round 0: before training), as in ``metrics.jsonl``.
    summary : dict[str, Any]
        As in ``summary.json``: before/after evaluation, bytes, time.
    adapter : dict[str, LoraFactors] | None
        The final global LoRA factors per module (``None`` for full-model seed/scalar runs).
    spec : LoraSpec | None
        The adapter's structure (rank, alpha, target modules).
    zo_coeffs : numpy.ndarray | None
        Seed/scalar strategies: the global coefficients (blocks x K).
    out_dir : Path | None
        The run folder, if ``out_dir`` was given (the same files as ``fedpeft simulate``).
    """

    config: RunConfig
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    adapter: Adapter | None
    spec: LoraSpec | None
    zo_coeffs: np.ndarray | None
    out_dir: Path | None


def _config(
    config_or_path: RunConfig | str | Path | None, overrides: Mapping[str, Any] | None
) -> RunConfig:
    if isinstance(config_or_path, RunConfig):
        if not overrides:
            return config_or_path
        text = dump_toml(config_to_dict(config_or_path))
        return load_config(None, dict(overrides), text=text)
    return load_config(config_or_path, dict(overrides or {}))


def _records(data: Any) -> list[dict[str, Any]]:
    """Records from a ``datasets.Dataset`` (or anything iterable of mappings)."""
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise ConfigError(
            f"data must be a datasets.Dataset or a list of records (dicts), got {type(data)}"
        )
    records = [dict(r) for r in data]
    if not records or not all(isinstance(r, dict) for r in records):
        raise ConfigError("data has no records; give a datasets.Dataset or a list of dicts")
    return records


def _model(model: Any) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` from a model or a ``(model, tokenizer)`` pair, copied."""
    if isinstance(model, Sequence) and len(model) == 2:
        net, tok = model
    else:
        net, tok = model, None
    if not hasattr(net, "config") or not callable(getattr(net, "forward", None)):
        raise ConfigError(f"model must be a transformers causal LM, got {type(net).__name__}")
    name = str(getattr(net.config, "name_or_path", "") or type(net).__name__)
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"no tokenizer for the model ({name!r}: {err}); pass model=(model, tokenizer)"
            ) from None
    return copy.deepcopy(net), copy.deepcopy(tok), name


def simulate(
    config_or_path: RunConfig | str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    model: Any = None,
    data: Any = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> SimulationResult:
    """Run a federated simulation and return its results.

    Parameters
    ----------
    config_or_path : RunConfig | str | Path | None
        A scenario TOML, a loaded :class:`~fedpeft.config.RunConfig`, or ``None`` (defaults).
    overrides : Mapping[str, Any] | None
        Dotted keys to values, e.g. ``{"federation.rounds": 2, "lora.rank": 4}``.
    model : transformers model | (model, tokenizer) | None
        A loaded causal LM to fine-tune instead of ``model.name`` (copied, never changed;
        in-process backend only). Without a tokenizer, it is loaded from the model's
        ``name_or_path``.
    data : datasets.Dataset | list[dict] | None
        Records to use instead of the file ``data.path`` (split and partitioned as
        ``[data]`` and ``[federation]`` say).
    out_dir : str | Path | None
        Write the run folder there (as ``fedpeft simulate --out``); ``None``: a temporary
        folder, removed afterwards.
    progress : bool
        Show the progress bar and the result table.

    Raises
    ------
    ConfigError
        If the scenario, the overrides, or the model/data arguments are invalid.
    """
    cfg = _config(config_or_path, overrides)
    if model is not None and cfg.simulation.backend != "inprocess":
        raise ConfigError(
            "model= lives in this process; simulation.backend = 'ray' loads the model in each "
            "worker: use simulation.backend = 'inprocess', or model.name instead of model="
        )
    cache = ProcessCache()  # this call's own: nothing leaks into or out of it
    if model is not None:
        net, tok, name = _model(model)
        cache.get(model_key(cfg.model), lambda: handle_of(net, tok, name, cfg.model))
    if data is not None:
        records = _records(data)
        seed = cfg.federation.seed
        cache.get(task_key(cfg.data, seed), lambda: split_records(records, cfg.data, seed, "data"))
    with tempfile.TemporaryDirectory(prefix="fedpeft-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        outcome = Outcome()
        summary = run_scenario(cfg, folder, quiet=not progress, cache=cache, outcome=outcome)
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x) for x in lines]
    final = outcome.model
    adapter, spec, coeffs = None, None, None
    if final is not None and final.zo is not None:
        coeffs = np.array(final.zo.coeffs, copy=True)
        lora = final.zo.spec.lora
        if lora is not None:  # seed/scalar over LoRA: the factors the coefficients give
            adapter, spec = _zo_lora_adapter(cfg, cache, final), lora
    elif final is not None:
        adapter, spec = final.adapter, final.spec
    return SimulationResult(
        config=cfg,
        rows=rows,
        summary=summary,
        adapter=adapter,
        spec=spec,
        zo_coeffs=coeffs,
        out_dir=Path(out_dir) if out_dir is not None else None,
    )


def _zo_lora_adapter(cfg: RunConfig, cache: ProcessCache, final: Any) -> Adapter:
    handle = get_model(cfg.model, cache)
    rt = get_runtime(handle, final.zo.spec, cache, direction_mask(resolve(cfg.strategy.name)))
    rt.set_global(final.zo.coeffs, final.zo.version)
    return handle.get_factors(handle.ensure_adapter(final.zo.spec.lora))
