"""The side-by-side summary table of a report, as Markdown and as HTML.

One row per run group (the seeds of one scenario): final eval loss and task metric (mean ±
spread over seeds), their change from round 0, total MB up and down, rounds, and time (the
simulated clock when devices were simulated, else the wall seconds of ``summary.json``, the
figure the run's own table shows). The numbers are read from each run's ``metrics.jsonl`` (and
``summary.json`` for the time), nothing is recomputed. Below the table: each run's split
(``split.json``) and a few held-out answers before and after training
(``predictions.jsonl``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from fedpeft.report.runs import Run, RunGroup, mean_spread

__all__ = ["Row", "details_markdown", "summary_rows", "to_html", "to_markdown"]

COLUMNS = (
    "run", "seeds", "rounds", "eval loss", "Δ loss", "metric", "Δ metric", "own loss mean",
    "own loss worst 10%", "MB up", "MB down", "time s",
)  # fmt: skip


@dataclass
class Row:
    """One line of the table; ``cells`` are formatted, ``values`` are the raw means."""

    cells: list[str]
    values: dict[str, float | None]


def _fmt(pair: tuple[float, float] | None, digits: int) -> str:
    if pair is None:
        return "-"
    mean, spread = pair
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread else "")


def _first(run: Run, key: str) -> float | None:
    _, ys = run.series(key)
    return ys[0] if ys else None


def _deltas(group: RunGroup, key: str) -> list[float]:
    out = []
    for r in group.runs:
        a, b = _first(r, key), r.final(key)
        if a is not None and b is not None:
            out.append(b - a)
    return out


def _time(run: Run) -> float:
    """The simulated clock's end, or the wall time ``summary.json`` and the run's own table
    give (model loading and saving included); a run without a summary: its rounds' time."""
    kind, clock = run.clock()
    if kind == "wall" and isinstance(run.summary.get("wall_s"), (int, float)):
        return float(run.summary["wall_s"])
    return clock[-1] if clock else 0.0


def summary_rows(groups: Sequence[RunGroup], reference: Run | None = None) -> list[Row]:
    """The table's rows (the reference, when given, last)."""
    rows = []
    for g in [
        *groups,
        *([RunGroup(f"{reference.name} (reference)", [reference])] if reference else []),
    ]:
        metric = g.runs[0].metric
        pairs = {
            "eval_loss": mean_spread(g.values("eval_loss")),
            "d_loss": mean_spread(_deltas(g, "eval_loss")),
            "metric": mean_spread(g.values(metric)) if metric else None,
            "d_metric": mean_spread(_deltas(g, metric)) if metric else None,
            "mb_up": mean_spread([r.cumulative("bytes_up")[-1] / 1e6 for r in g.runs if r.rows]),
            "mb_down": mean_spread(
                [r.cumulative("bytes_down")[-1] / 1e6 for r in g.runs if r.rows]
            ),
            "time": mean_spread([_time(r) for r in g.runs if r.rows]),
            # eval.personalized: each client's own model on its own records
            "own_mean": mean_spread(g.values("personal_eval_loss_mean")),
            "own_worst": mean_spread(g.values("personal_eval_loss_worst10")),
        }
        rounds = max((int(r.rows[-1]["round"]) for r in g.runs if r.rows), default=0)
        cells = [
            g.name, str(len(g.runs)), str(rounds), _fmt(pairs["eval_loss"], 4),
            _fmt(pairs["d_loss"], 4),
            (_fmt(pairs["metric"], 4) + f" ({metric[5:]})") if pairs["metric"] else "-",
            _fmt(pairs["d_metric"], 4), _fmt(pairs["own_mean"], 4), _fmt(pairs["own_worst"], 4),
            _fmt(pairs["mb_up"], 2), _fmt(pairs["mb_down"], 2),
            _fmt(pairs["time"], 1),
        ]  # fmt: skip
        values = {k: (v[0] if v else None) for k, v in pairs.items()}
        rows.append(Row(cells, values))
    return rows


def to_markdown(rows: Sequence[Row]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def details_markdown(runs: Sequence[Run]) -> str:
    """Per run: its split (sizes, skew) and its held-out answers before and after training."""
    out = []
    for run in runs:
        parts = []
        if sp := run.split:
            sizes = sorted(c["train"] for c in sp.get("clients", []))
            if sizes:
                parts.append(
                    f"Split: {sp['partition']}"
                    + (f" by `{sp['partition_key']}`" if sp.get("partition_key") else "")
                    + f", {sp['num_clients']} clients, {sp['records_used']} training records "
                    f"used (per client min {sizes[0]}, median {sizes[len(sizes) // 2]}, max "
                    f"{sizes[-1]}); skew mean {sp['skew_mean']:.2f}, max {sp['skew_max']:.2f} "
                    "(total variation from the overall key mix)."
                )
        if run.predictions:
            head = "| prompt | reference | before | after |\n|---|---|---|---|"
            cells = [
                "| " + " | ".join(_cell(p.get(k, "-")) for k in
                                  ("prompt", "reference", "before", "after")) + " |"
                for p in run.predictions
            ]  # fmt: skip
            parts.append("Held-out answers:\n\n" + "\n".join([head, *cells]))
        if parts:
            out.append(f"### {run.name} ({run.path.name})\n\n" + "\n\n".join(parts))
    return "\n\n".join(out) + ("\n" if out else "")


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", " ") or "(empty)"


def to_html(rows: Sequence[Row], title: str, images: Sequence[str], details: str = "") -> str:
    """A self-contained HTML page: the table, the plots (relative paths), then ``details``
    (:func:`details_markdown`, shown as preformatted text)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r.cells) + "</tr>" for r in rows
    )
    figs = "".join(f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images)
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table><tr>{head}</tr>{body}</table>{figs}"
        + (f"<pre>{html.escape(details)}</pre>" if details else "")
        + "</body></html>\n"
    )
