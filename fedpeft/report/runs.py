"""Read finished (or running) run folders and group the seeds of one scenario.

A run folder is what ``fedpeft simulate`` or ``fedpeft server`` writes: ``metrics.jsonl`` (one
row per round; round 0 is the evaluation before training), ``summary.json`` (when finished),
``config.toml``, and when present ``predictions.jsonl`` (a few held-out answers before and
after training) and ``split.json`` (how the data was split, :mod:`fedpeft.data.inspect`).
Runs whose configurations differ only in ``federation.seed`` form one *group*; its numbers
are reported as mean ± spread (sample standard deviation, 0 for one run).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.errors import FedpeftError

__all__ = ["Run", "RunGroup", "group_runs", "load_run", "mean_spread"]


@dataclass
class Run:
    """One run folder's metrics, summary and configuration."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]
    predictions: list[dict[str, str]] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The scenario name, or the folder's name."""
        return str(self.config.get("name") or self.path.name)

    @property
    def seed(self) -> int:
        """The run seed."""
        return int(self.config.get("federation", {}).get("seed", 0))

    @property
    def metric(self) -> str:
        """The task metric's key in the rows (``eval_rougeL``, ...), or ``""``."""
        name = self.config.get("data", {}).get("metric", "none")
        return "" if name == "none" else f"eval_{name}"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(rounds, values)`` of the rows that have a finite ``key``."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                xs.append(int(r["round"]))
                ys.append(float(v))
        return xs, ys

    def cumulative(self, key: str) -> list[float]:
        """Running sum of ``key`` over the rows (missing counts as 0)."""
        total, out = 0.0, []
        for r in self.rows:
            total += float(r.get(key) or 0.0)
            out.append(total)
        return out

    def clock(self) -> tuple[str, list[float]]:
        """``("simulated", ...)`` when devices were simulated, else ``("wall", ...)`` seconds
        at the end of each round (from the start of round 0; model loading not counted)."""
        if any("sim_wall_s" in r for r in self.rows):
            return "simulated", [float(r.get("sim_wall_s") or 0.0) for r in self.rows]
        return "wall", self.cumulative("wall_s")

    def final(self, key: str) -> float | None:
        """The last finite value of ``key``."""
        _, ys = self.series(key)
        return ys[-1] if ys else None


@dataclass
class RunGroup:
    """Runs of one scenario that differ only in their seed."""

    name: str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        """The final ``key`` of each run that has one."""
        return [v for v in (r.final(key) for r in self.runs) if v is not None]


def mean_spread(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value); ``None`` for none."""
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_run(path: str | Path) -> Run:
    """Read a run folder.

    Raises
    ------
    FedpeftError
        If the folder has no ``metrics.jsonl`` or a line of it is not JSON.
    """
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise FedpeftError(f"{str(p)!r} is not a run folder: it has no metrics.jsonl")
    rows = []
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FedpeftError(f"{metrics}:{n} is not JSON: {err}") from None
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    config = tomllib.loads((p / "config.toml").read_text()) if (p / "config.toml").is_file() else {}
    predictions = [json.loads(x) for x in _text(p / "predictions.jsonl").splitlines() if x.strip()]
    split = json.loads(_text(p / "split.json") or "{}")
    return Run(p, rows, summary, config, predictions, split)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _without_seed(config: dict[str, Any]) -> str:
    fed = {k: v for k, v in config.get("federation", {}).items() if k != "seed"}
    return json.dumps({**config, "federation": fed}, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Group runs whose configurations differ only in the seed (order of first appearance)."""
    groups: dict[str, RunGroup] = {}
    for r in runs:
        key = _without_seed(r.config) if r.config else str(r.path)
        groups.setdefault(key, RunGroup(r.name)).runs.append(r)
    out = list(groups.values())
    names = [g.name for g in out]
    for g in out:  # two scenarios of one name (overrides): tell them apart by folder
        if names.count(g.name) > 1:
            g.name = f"{g.name} ({g.runs[0].path.name})"
    return out
