"""PNG plots of runs (matplotlib, headless ``Agg`` backend: no display needed).

Every function takes run groups (seeds of one scenario are averaged per round, with a band of
± one standard deviation when there are several) and returns the ``Figure`` it saved, so
tests can read the plotted series back.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpeft.report.runs import Run, RunGroup  # noqa: E402

__all__ = ["PARTICIPATION", "plot_choices", "plot_metric", "plot_participation", "plot_tradeoff"]

Series = Callable[[Run], tuple[list[float], list[float]]]


def _per_round(group: RunGroup, series: Series) -> tuple[list[float], list[float], list[float]]:
    """x, mean y and std of y over the group's runs, matched by position in each run."""
    xs: dict[int, list[float]] = defaultdict(list)
    ys: dict[int, list[float]] = defaultdict(list)
    for run in group.runs:
        x, y = series(run)
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            xs[i].append(a)
            ys[i].append(b)
    keys = sorted(ys)
    mx = [statistics.fmean(xs[i]) for i in keys]
    my = [statistics.fmean(ys[i]) for i in keys]
    sd = [statistics.stdev(ys[i]) if len(ys[i]) > 1 else 0.0 for i in keys]
    return mx, my, sd


def _broken(
    x: list[float], y: list[float], sd: list[float]
) -> tuple[list[float], list[float], list[float]]:
    """The series with a NaN between rounds that are not consecutive, so no line is drawn
    across rounds nobody measured (the markers stay)."""
    bx, by, bsd = [], [], []
    for i, (a, b, c) in enumerate(zip(x, y, sd, strict=True)):
        if i and a - x[i - 1] > 1:
            bx.append((a + x[i - 1]) / 2)
            by.append(math.nan)
            bsd.append(0.0)
        bx.append(a)
        by.append(b)
        bsd.append(c)
    return bx, by, bsd


def _lines(
    groups: Sequence[RunGroup],
    series: Series,
    ax: Any,
    reference: float | None = None,
    by_round: bool = False,
) -> None:
    for g in groups:
        x, y, sd = _per_round(g, series)
        if not y:
            continue
        if by_round:
            x, y, sd = _broken(x, y, sd)
        label = g.name if len(g.runs) == 1 else f"{g.name} (n={len(g.runs)})"
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
        if any(sd):
            lo = [a - b for a, b in zip(y, sd, strict=True)]
            hi = [a + b for a, b in zip(y, sd, strict=True)]
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="grey", label="centralized reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Figure, path: Path) -> Figure:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_metric(
    groups: Sequence[RunGroup], key: str, label: str, path: Path, reference: float | None = None
) -> Figure:
    """``key`` (``eval_loss``, ``eval_rougeL``...) per round."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))

    def series(run: Run) -> tuple[list[float], list[float]]:
        x, y = run.series(key)
        return [float(i) for i in x], y

    _lines(groups, series, ax, reference, by_round=True)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.set_title(f"{label} per round")
    return _save(fig, path)


def _against(x_of: Callable[[Run], list[float]]) -> Series:
    def series(run: Run) -> tuple[list[float], list[float]]:
        x = x_of(run)
        pts = [
            (x[i], float(r["eval_loss"]))
            for i, r in enumerate(run.rows)
            if isinstance(r.get("eval_loss"), (int, float))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    return series


def plot_tradeoff(
    groups: Sequence[RunGroup], what: str, path: Path, reference: float | None = None
) -> Figure:
    """Eval loss against cumulative ``bytes`` (up + down, MB) or the run's ``time`` (s)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if what == "bytes":

        def x_of(run: Run) -> list[float]:
            up, down = run.cumulative("bytes_up"), run.cumulative("bytes_down")
            return [(a + b) / 1e6 for a, b in zip(up, down, strict=True)]

        ax.set_xlabel("cumulative bytes up + down (MB)")
        ax.set_title("communication vs quality")
    else:
        kinds = {g.runs[0].clock()[0] for g in groups if g.runs}

        def x_of(run: Run) -> list[float]:
            return run.clock()[1]

        ax.set_xlabel(f"{' / '.join(sorted(kinds))} clock (s)")
        ax.set_title("time vs quality")
    _lines(groups, _against(x_of), ax, reference)
    ax.set_ylabel("eval loss")
    return _save(fig, path)


def _grid(
    run: Run, value: Callable[[dict[str, Any], str], float | None]
) -> tuple[list[str], list[list[float]]]:
    clients = sorted(
        {c for r in run.rows for c in r.get("client_ids", [])}
        | {c for r in run.rows for c in r.get("failures", {})},
        key=lambda c: (len(c), c),
    )
    rounds = [r for r in run.rows if r.get("round", 0) > 0]
    grid = [[_or_nan(value(r, c)) for r in rounds] for c in clients]
    return clients, grid


def _or_nan(v: float | None) -> float:
    return float("nan") if v is None else v


#: Participation categories: value in the grid, label, colour.
PARTICIPATION = ((0, "not sampled", "#e8e8e8"), (1, "failed or rejected", "#d95f02"),
                 (2, "trained", "#1b9e77"))  # fmt: skip


def plot_participation(run: Run, path: Path) -> Figure:
    """Which clients trained, failed or were rejected, or were not sampled, per round: three
    colours with a legend."""

    def value(row: dict[str, Any], cid: str) -> float:
        if cid in row.get("client_ids", []):
            return 2.0
        return 1.0 if cid in row.get("failures", {}) else 0.0

    clients, grid = _grid(run, value)
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.3 * len(clients) + 1.2)))
    colours = ListedColormap([c for _, _, c in PARTICIPATION])
    ax.imshow(grid, aspect="auto", cmap=colours, vmin=-0.5, vmax=2.5, interpolation="nearest")
    ax.set_yticks(range(len(clients)), clients)
    _round_columns(ax, len(grid[0]) if grid else 0)
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.set_title(f"{run.name}: participation")
    handles = [Patch(facecolor=c, edgecolor="grey", label=t) for _, t, c in PARTICIPATION]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def _round_columns(ax: Any, n: int) -> None:
    """Label grid columns 0..n-1 as rounds 1..n (at most about 12 labels)."""
    step = max(1, math.ceil(n / 12))
    ax.set_xticks(range(0, n, step), [str(i + 1) for i in range(0, n, step)])


def plot_choices(run: Run, key: str, label: str, path: Path) -> Figure:
    """A per-client value over rounds (``client_ranks``, ``client_prune``,
    ``client_peak_mem_mb``); blank where a client did not train."""

    def value(row: dict[str, Any], cid: str) -> float | None:
        v = row.get(key, {}).get(cid)
        return float(v) if v is not None else None

    clients, grid = _grid(run, value)
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.3 * len(clients) + 1.2)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(clients)), clients)
    _round_columns(ax, len(grid[0]) if grid else 0)
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.set_title(f"{run.name}: {label} per client and round")
    fig.colorbar(image, ax=ax, label=label)
    return _save(fig, path)
