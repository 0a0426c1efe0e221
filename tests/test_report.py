"""``fedpeft report``: plots render headless with the right series; the table equals the files."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.errors import FedpeftError
from fedpeft.report import group_runs, load_run, write_report
from fedpeft.report.plots import plot_metric, plot_tradeoff
from fedpeft.report.tables import summary_rows
from fedpeft.server.results import RunReporter
from fedpeft.simulation.runner import simulate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo) -> dict[str, Path]:
    """Two seeds of the tiny scenario and one heterogeneous-rank run (2 rounds each)."""
    from fedpeft.cache import ProcessCache
    from fedpeft.config.load import load_config

    base = tmp_path_factory.mktemp("runs")
    cache = ProcessCache()
    toml = repo / "simulations" / "tiny.toml"
    small = ["federation.num_clients=3", "federation.rounds=2", "train.local_steps=2",
             "eval.examples=8", "data.max_examples_per_client=24"]  # fmt: skip
    out = {}
    for name, extra in {
        "seed0": ["federation.seed=0"],
        "seed1": ["federation.seed=1"],
        "hetero": [
            "strategy.name=hetlora",
            "ranks.mode=tiers",
            "ranks.tiers=[2,4]",
            "eval.personalized=true",
        ],
    }.items():
        cfg = load_config(toml, [*small, *extra])
        simulate(cfg, base / name, quiet=True, cache=cache, tensorboard=name == "seed0")
        out[name] = base / name
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_every_plot_renders_as_a_png(runs, tmp_path):
    files = write_report([runs["seed0"], runs["seed1"], runs["hetero"]], tmp_path / "rep")
    pngs = {n for n in files if n.endswith(".png")}
    assert {"eval_loss.png", "bytes_vs_loss.png", "time_vs_loss.png"} <= pngs
    assert any(n.startswith("participation-") for n in pngs)
    assert any(n.startswith("ranks-2-hetero") for n in pngs)  # per-client rank choices
    assert {f"memory-{i}-{n}.png" for i, n in enumerate(["seed0", "seed1", "hetero"])} <= pngs
    assert {"personal_eval_loss_mean.png", "personal_eval_loss_worst10.png"} <= pngs
    import matplotlib.image

    for name in pngs:
        data = files[name].read_bytes()
        assert data.startswith(PNG), name
        image = matplotlib.image.imread(files[name])
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # not blank
    html = files["index.html"].read_text()
    assert "<table>" in html and all(n in html for n in pngs)


def test_seeds_are_one_group_and_the_plotted_series_is_their_mean(runs, tmp_path):
    groups = group_runs(
        [load_run(runs["seed0"]), load_run(runs["seed1"]), load_run(runs["hetero"])]
    )
    assert [len(g.runs) for g in groups] == [2, 1]
    fig = plot_metric(groups, "eval_loss", "eval loss", tmp_path / "loss.png")
    line = fig.axes[0].lines[0]
    a = [r["eval_loss"] for r in _rows(runs["seed0"])]
    b = [r["eval_loss"] for r in _rows(runs["seed1"])]
    assert list(line.get_xdata()) == [0, 1, 2]
    assert list(line.get_ydata()) == pytest.approx([(x + y) / 2 for x, y in zip(a, b, strict=True)])
    assert len(fig.axes[0].collections) >= 1  # the ± std band of the two seeds
    fig = plot_tradeoff(groups[1:], "bytes", tmp_path / "bytes.png")
    rows = _rows(runs["hetero"])
    total, xs = 0.0, []
    for r in rows:
        total += r["bytes_up"] + r["bytes_down"]
        xs.append(total / 1e6)
    assert list(fig.axes[0].lines[0].get_xdata()) == pytest.approx(xs)


def test_summary_table_numbers_equal_the_metrics_files(runs):
    groups = group_runs([load_run(runs["seed0"]), load_run(runs["seed1"])])
    (row,) = summary_rows(groups)
    finals = [_rows(runs[s])[-1]["eval_loss"] for s in ("seed0", "seed1")]
    assert row.values["eval_loss"] == pytest.approx(statistics.fmean(finals))
    assert row.cells[3] == f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"
    ups = [sum(r["bytes_up"] for r in _rows(runs[s])) / 1e6 for s in ("seed0", "seed1")]
    assert row.values["mb_up"] == pytest.approx(statistics.fmean(ups))
    assert row.cells[1] == "2" and row.cells[2] == "2"
    assert row.cells[7] == "-"  # no personalized evaluation in these runs
    (hetero,) = summary_rows(group_runs([load_run(runs["hetero"])]))
    last = _rows(runs["hetero"])[-1]
    assert hetero.values["own_mean"] == pytest.approx(last["personal_eval_loss_mean"])
    assert hetero.values["own_worst"] == pytest.approx(last["personal_eval_loss_worst10"])
    assert last["personal_eval_loss_worst10"] >= last["personal_eval_loss_mean"]


def test_report_cli_prints_the_table_and_a_reference_line(runs, tmp_path, capsys):
    rc = main(["report", str(runs["seed0"]), "--reference", str(runs["hetero"]),
               "--out", str(tmp_path / "rep")])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| run | seeds |" in text and "(reference)" in text
    assert "index.html" in text


def test_a_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FedpeftError, match="has no metrics.jsonl"):
        load_run(tmp_path)


def test_tensorboard_scalars_equal_the_metrics(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["seed0"] / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("eval_loss")
    rows = _rows(runs["seed0"])
    assert [e.step for e in events] == [r["round"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["eval_loss"] for r in rows], rel=1e-6)


def test_progress_bar_shows_eta_latest_loss_and_client_replies(tmp_path):
    stream = io.StringIO()
    rep = RunReporter(tmp_path, rounds=3, quiet=False, stream=stream)
    rep.on_row({"round": 0, "eval_loss": 4.5, "train_loss": None})
    rep.on_reply(1, None)
    rep.on_row({"round": 1, "eval_loss": 3.25, "train_loss": 3.5})
    rep.on_reply(1, None)
    rep.on_reply(2, None)
    rep.bar.refresh()
    text = stream.getvalue()
    assert "eval_loss 4.500 | round 1: 1 client replies" in text
    assert "eval_loss 3.250 | round 2: 2 client replies" in text
    assert "<" in text  # tqdm's elapsed<remaining (the ETA)
    quiet = io.StringIO()
    RunReporter(tmp_path / "q", rounds=3, quiet=True, stream=quiet).on_row({"round": 0})
    assert quiet.getvalue() == ""


class _Clock:
    """A settable clock for tqdm: elapsed times without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_counts_training_rounds_only_and_the_start_evaluation_is_shown(tmp_path):
    stream = io.StringIO()
    rep = RunReporter(tmp_path, rounds=3, quiet=False, stream=stream)
    clock = _Clock()
    rep.bar._time = clock  # tqdm reads its clock through this attribute
    rep.bar.reset(total=3)
    rep.on_phase("evaluating the start model on 32 examples")
    assert "evaluating the start model on 32 examples" in stream.getvalue()
    clock.now = 1000.0  # a slow evaluation before training
    rep.on_row({"round": 0, "eval_loss": 4.5, "train_loss": None})
    clock.now = 1010.0  # one training round of 10 s
    rep.on_row({"round": 1, "eval_loss": 4.0, "train_loss": 4.2})
    rep.bar.refresh()
    last = stream.getvalue().rsplit("\r", 1)[-1]
    assert "1/3" in last and "<00:20" in last, last  # 2 rounds left at 10 s each


def test_a_resumed_run_times_only_the_rounds_it_runs(tmp_path):
    stream = io.StringIO()
    rep = RunReporter(tmp_path, rounds=4, quiet=False, stream=stream, resume=True)
    clock = _Clock()
    rep.bar._time = clock
    rep.bar.reset(total=4)
    for r in (0, 1, 2):  # restored from the checkpoint, written again at once
        rep.on_row({"round": r, "eval_loss": 4.0, "train_loss": 4.0 if r else None})
    clock.now = 500.0  # waiting for the nodes to come back
    rep.on_phase("waiting for clients")
    clock.now = 530.0
    rep.on_row({"round": 3, "eval_loss": 3.9, "train_loss": 3.9})
    rep.bar.refresh()
    last = stream.getvalue().rsplit("\r", 1)[-1]
    assert "3/4" in last and "<00:30" in last, last


def test_plots_mark_measured_rounds_only_with_integer_ticks_and_categorical_legends(runs, tmp_path):
    import math

    from fedpeft.report.plots import PARTICIPATION, plot_participation

    run = load_run(runs["seed0"])
    xs, _ = run.series("eval_rougeL")
    assert xs == [0, 2]  # the metric is computed before and after training only
    fig = plot_metric(group_runs([run]), "eval_rougeL", "rougeL", tmp_path / "m.png")
    (ax,) = fig.axes
    line = ax.lines[0]
    y = list(line.get_ydata())
    assert len(y) == 3 and math.isnan(y[1])  # no line across the unmeasured round 1
    assert line.get_marker() == "o"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    loss = plot_metric(group_runs([run]), "eval_loss", "eval loss", tmp_path / "l.png")
    assert not any(math.isnan(v) for v in loss.axes[0].lines[0].get_ydata())  # every round
    part = plot_participation(run, tmp_path / "p.png")
    assert len(part.axes) == 1  # a legend, no colour bar
    labels = [t.get_text() for t in part.axes[0].get_legend().get_texts()]
    assert labels == [label for _, label, _ in PARTICIPATION]
    assert [t.get_text() for t in part.axes[0].get_xticklabels()] == ["1", "2"]


def test_the_report_shows_the_split_the_answers_and_the_runs_own_wall_time(runs, tmp_path):
    run = load_run(runs["seed0"])
    assert run.split["records_used"] == sum(c["train"] for c in run.split["clients"])
    assert len(run.predictions) == 5 and {"before", "after"} <= set(run.predictions[0])
    (row,) = summary_rows(group_runs([run]))
    assert row.values["time"] == run.summary["wall_s"]  # the figure the run's own table shows
    write_report([runs["seed0"]], tmp_path / "rep")
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "Split: natural by `domain`, 3 clients" in text
    assert run.predictions[0]["reference"].strip() in text
