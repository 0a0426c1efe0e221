"""Federated quality against centralized training on non-IID data, side by side.

SmolLM2-135M-Instruct on the WordNet task, 8 clients, every client every round, LoRA r=8 on
q/v (mixed-rank rows: ranks 2/4/8/16); ``--rounds`` rounds of ``--local-steps`` AdamW steps
per client, and the centralized reference (one client holding all the data) with the same
total optimizer steps (``simulations/centralized.toml``: local steps x clients per round).
Two splits: ``natural`` (one group of WordNet domains per client) and ``dirichlet``
(alpha = 0.1 over the domains), the latter for a subset of the rows. Every row runs with
``--seeds`` seeds (the Dirichlet and mixed-rank rows with the first only, unless
``--all-seeds``); the table gives the mean ± spread (sample std) over them:

- eval loss after the last round and its Rouge-L (the coordinator's held-out records);
- ``% gain``: ``(L_0 - L) / (L_0 - L_central)``, the share of the centralized run's loss
  reduction the row recovers (same seed, same start ``L_0``);
- own-model loss, mean over clients and worst decile (``eval.personalized``: each client's
  own model on its own held-out records; FedSA-LoRA's clients keep their own B);
- MB up and down per client-round, and wall seconds.

Each run is its own ``fedpeft simulate`` process (a clean state); ``--jobs 2`` runs two at a
time with one torch thread each (faster on 2 cores; wall seconds are then under contention).
Evaluation is before and after only, on ``--eval-examples`` records. Writes
``benchmarks/results/quality.json`` and prints the table.

    .venv/bin/python benchmarks/quality.py [--rounds 3] [--local-steps 2] [--seeds 0 1]
        [--eval-examples 16] [--jobs 2] [--only NAME ...] [--splits natural dirichlet]
        [--out runs/quality]
        [--quick]   # tiny model, 1 round, a few rows, one seed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _bench import QUICK_OVERRIDES, QUICK_TITLE, REPO, add_quick, results_path, simulate_cli

MIXED = ["ranks.mode=tiers", "ranks.tiers=[2,4,8,16]"]
PROX = "strategy.name='strategies/fedprox.py:FedProx'"
# name -> (overrides, splits it runs on); the centralized reference runs once per seed
ROWS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "fedavg": ([], ("natural", "dirichlet")),
    "fedavgm (m 0.9)": (
        ["server_opt.name=avgm", "server_opt.momentum=0.9"],
        ("natural", "dirichlet"),
    ),  # fmt: skip
    "fedavg, server lr 2": (
        ["server_opt.name=avgm", "server_opt.momentum=0", "server_opt.lr=2"],
        ("natural",),
    ),
    "fedadam (lr 1e-2)": (["server_opt.name=adam", "server_opt.lr=0.01"], ("natural",)),
    "fedyogi (lr 1e-2)": (["server_opt.name=yogi", "server_opt.lr=0.01"], ("natural",)),
    "fedprox (mu 0.01)": ([PROX, "strategy.options.mu=0.01"], ("natural",)),
    "scaffold": (["strategy.name=scaffold"], ("natural", "dirichlet")),
    "fedsa": (["strategy.name=fedsa"], ("natural", "dirichlet")),
    "ffa": (["strategy.name=ffa"], ("natural",)),
    "fedavgm (m 0.9) + cosine lr 3e-3": (
        [
            "server_opt.name=avgm",
            "server_opt.momentum=0.9",
            "train.lr_schedule=cosine",
            "train.lr=3e-3",
        ],
        ("natural",),
    ),  # fmt: skip
    "hetlora 2/4/8/16": ([*MIXED, "strategy.name=hetlora"], ("natural",)),
    "hetlora nested": (
        [*MIXED, "strategy.name=hetlora", "strategy.options.nested=true"],
        ("natural",),
    ),  # fmt: skip
    "flexlora 2/4/8/16": ([*MIXED, "strategy.name=flexlora"], ("natural",)),
    "flexlora nested": (
        [*MIXED, "strategy.name=flexlora", "strategy.options.nested=true"],
        ("natural",),
    ),  # fmt: skip
}
SPLITS = {
    "natural": [],
    "dirichlet": ["federation.partition=dirichlet", "federation.dirichlet_alpha=0.1"],
}
QUICK_ROWS = ["fedavg", "scaffold", "fedsa"]


def common(args: argparse.Namespace, seed: int) -> list[str]:
    """Overrides every run of one seed shares."""
    return [
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"federation.seed={seed}",
        "eval.every=0",
        "eval.metric_every=0",
        f"eval.examples={args.eval_examples}",
        "eval.personalized=true",
        *(QUICK_OVERRIDES if args.quick else []),
    ]


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, str, list[str]]]:
    """``(row, split, seed, scenario file, overrides)`` of every run, references first.

    The Dirichlet rows and the mixed-rank rows run with the first seed only unless
    ``--all-seeds`` (the 90-minute budget on 2 cores)."""
    out = [("centralized", "-", s, "centralized.toml", ["federation.min_clients=1"])
           for s in args.seeds]  # fmt: skip
    for name, (extra, splits) in ROWS.items():
        if args.only and name not in args.only:
            continue
        for split in splits:
            if split not in args.splits:
                continue
            one = not args.all_seeds and (split != "natural" or "ranks.mode=tiers" in extra)
            seeds = args.seeds[:1] if one else args.seeds
            out += [(name, split, s, "default.toml", [*SPLITS[split], *extra]) for s in seeds]
    return out


def run_one(args: argparse.Namespace, job: tuple[str, str, int, str, list[str]]) -> dict[str, Any]:
    """One simulation in its own process; its summary and final metrics row."""
    name, split, seed, toml, extra = job
    slug = f"{name}-{split}-{seed}".replace(" ", "_").replace("/", "_").replace(":", "")
    out = Path(args.out) / slug.replace("+", "and")
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else {}
    overrides = [*common(args, seed), *extra]
    done = out / "summary.json"
    same = out / "overrides.json"
    if not (args.reuse and done.exists() and same.exists()
            and json.loads(same.read_text()) == overrides):  # fmt: skip
        simulate_cli(toml, out, overrides, env=threads)
        same.write_text(json.dumps(overrides))
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"done: {name} ({split}, seed {seed})", file=sys.stderr, flush=True)
    return {"row": name, "split": split, "seed": seed, "summary": summary, "last": rows[-1]}


def _ms(values: list[float], digits: int, scale: float = 1.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One line per (row, split): every column as mean ± spread over the seeds."""
    central = {r["seed"]: r for r in results if r["row"] == "centralized"}
    lines = []
    keys = dict.fromkeys((r["row"], r["split"]) for r in results)
    for row, split in keys:
        runs = [r for r in results if (r["row"], r["split"]) == (row, split)]

        def vals(get: Any, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [float(v) for v in (get(r) for r in runs) if isinstance(v, (int, float))]

        def gain(r: dict[str, Any]) -> float | None:
            ref = central.get(r["seed"])
            if ref is None:
                return None
            start = r["summary"]["before"]["eval_loss"]
            done = start - ref["summary"]["after"]["eval_loss"]
            return (start - r["summary"]["after"]["eval_loss"]) / done if done else None

        lines.append({
            "row": row, "split": split, "seeds": len(runs),
            "eval_loss": vals(lambda r: r["summary"]["after"]["eval_loss"]),
            "metric": vals(lambda r: r["summary"]["after"].get(f"eval_{metric}")),
            "gain": vals(gain),
            "own_mean": vals(lambda r: r["last"].get("personal_eval_loss_mean")),
            "own_worst": vals(lambda r: r["last"].get("personal_eval_loss_worst10")),
            "mb_up": vals(lambda r: r["summary"]["bytes_up_per_client_round"] / 1e6),
            "mb_down": vals(lambda r: r["summary"]["bytes_down_per_client_round"] / 1e6),
            "wall": vals(lambda r: r["summary"]["wall_s"]),
        })  # fmt: skip
    return lines


def markdown(lines: list[dict[str, Any]], metric: str) -> str:
    """The table as GitHub Markdown."""
    head = ["run", "split", "seeds", "eval loss", metric, "% gain", "own loss mean",
            "own loss worst 10%", "MB up", "MB down", "wall s"]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in lines:
        cells = [
            x["row"], x["split"], str(x["seeds"]), _ms(x["eval_loss"], 4), _ms(x["metric"], 4),
            _ms(x["gain"], 1, 100.0), _ms(x["own_mean"], 4), _ms(x["own_worst"], 4),
            _ms(x["mb_up"], 2), _ms(x["mb_down"], 2), _ms(x["wall"], 0),
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each if > 1)")
    ap.add_argument("--out", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the row names")
    ap.add_argument("--all-seeds", action="store_true", help="every row with every seed")
    ap.add_argument(
        "--reuse", action="store_true",
        help="keep a finished run whose folder holds the same overrides (a stopped benchmark "
        "goes on where it was)",
    )  # fmt: skip
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seeds, args.splits = 1, [0], ["natural"]
        args.only = args.only or QUICK_ROWS
    jobs = plan(args)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: run_one(args, j), jobs))
    metric = "rougeL"
    lines = table(results, metric)
    title = QUICK_TITLE if args.quick else "SmolLM2-135M"
    steps = 8 * args.rounds * args.local_steps
    print(f"\n{title}, WordNet, 8 clients x {args.rounds} rounds x {args.local_steps} local "
          f"steps ({steps} optimizer steps in all; centralized: the same), eval on "
          f"{args.eval_examples} records, seeds {args.seeds}\n")  # fmt: skip
    print(markdown(lines, metric))
    blob = {"rounds": args.rounds, "local_steps": args.local_steps, "seeds": args.seeds,
            "eval_examples": args.eval_examples, "jobs": args.jobs, "lines": lines,
            "runs": results}  # fmt: skip
    results_path("quality.json").write_text(json.dumps(blob, indent=2))


if __name__ == "__main__":
    main()
