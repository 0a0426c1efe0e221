"""``fedpeft report``: plots and a side-by-side table of finished runs (docs/report.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpeft.report.runs import Run, RunGroup, group_runs, load_run, mean_spread

__all__ = ["Run", "RunGroup", "group_runs", "load_run", "mean_spread", "write_report"]


def write_report(
    dirs: Sequence[str | Path], out: str | Path, reference: str | Path | None = None
) -> dict[str, Path]:
    """Read the run folders, write the plots, ``summary.md`` and ``index.html`` to ``out``.

    Returns every written file by name. Plots: ``eval_loss.png``, the task metric's
    (``eval_<metric>.png``) when the runs have one, ``bytes_vs_loss.png``,
    ``time_vs_loss.png``, ``personal_eval_loss_mean.png`` / ``_worst10.png`` when the runs
    evaluated each client's own model (``eval.personalized``), and per run
    ``participation-<run>.png`` and, when present, ``ranks-<run>.png`` / ``prune-<run>.png``.
    ``reference`` (a centralized run) adds a line at its final eval loss and a row to the
    table.
    """
    from fedpeft.report.plots import plot_choices, plot_metric, plot_participation, plot_tradeoff
    from fedpeft.report.tables import details_markdown, summary_rows, to_html, to_markdown

    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in dirs]
    groups = group_runs(runs)
    ref = load_run(reference) if reference is not None else None
    ref_loss = ref.final("eval_loss") if ref is not None else None
    files: dict[str, Path] = {}

    def put(name: str) -> Path:
        files[name] = target / name
        return files[name]

    plot_metric(groups, "eval_loss", "eval loss", put("eval_loss.png"), ref_loss)
    metric = runs[0].metric
    if metric and any(r.series(metric)[1] for r in runs):
        plot_metric(groups, metric, metric[5:], put(f"{metric}.png"))
    for stat, what in (("mean", "mean over clients"), ("worst10", "worst 10% of clients")):
        key = f"personal_eval_loss_{stat}"  # eval.personalized: each client's own model
        if any(r.series(key)[1] for r in runs):
            plot_metric(groups, key, f"own-model eval loss, {what}", put(f"{key}.png"))
    plot_tradeoff(groups, "bytes", put("bytes_vs_loss.png"), ref_loss)
    plot_tradeoff(groups, "time", put("time_vs_loss.png"), ref_loss)
    for i, run in enumerate(runs):
        tag = f"{i}-{run.path.name}"
        plot_participation(run, put(f"participation-{tag}.png"))
        if any("client_ranks" in r for r in run.rows):
            plot_choices(run, "client_ranks", "LoRA rank", put(f"ranks-{tag}.png"))
        if any("client_prune" in r for r in run.rows):
            plot_choices(run, "client_prune", "pruning ratio", put(f"prune-{tag}.png"))
        if any("client_peak_mem_mb" in r for r in run.rows):
            label = "peak training memory (MiB)"
            plot_choices(run, "client_peak_mem_mb", label, put(f"memory-{tag}.png"))
    rows = summary_rows(groups, ref)
    details = details_markdown(runs)
    table = to_markdown(rows) + (f"\n{details}" if details else "")
    put("summary.md").write_text(table, encoding="utf-8")
    images = [n for n in files if n.endswith(".png")]
    put("index.html").write_text(to_html(rows, "fedpeft report", images, details), encoding="utf-8")
    return files
