"""FedSpine on the real model: no pruning vs the best fixed (ratio, rank) arm vs the bandit.

``simulations/fedspine.toml``: SmolLM2-135M, WordNet split by domain over 12 clients on three
simulated device tiers (4 each of a TX2-, Xavier-NX- and AGX-shaped device: compute 6x, 3x
and 1x this machine's measured time, plus bytes over their bandwidth), every client every
round, the round waiting for the slowest. Runs, all with the ``fedspine`` strategy (same
masked aggregation):

- ``(a) no pruning r8``: the single arm (0.0, 8) for every device;
- ``fixed <ratio>/<rank>``: each other arm of the grid for every device (the sweep that finds
  the best fixed arm, (b));
- ``(c) bandit``: sliding-window UCB per device over the grid; ``(c2)`` the same over the two
  extreme arms only (half the exploration);
- ``(o) pinned tx2 0.75/4``: no learning, the TX2-shaped devices pinned to the most pruned
  arm and everyone else to no pruning (the assignment a bandit would hope to find: only the
  stragglers prune), to separate what the bandit fails to learn from what pruning costs.

Prints, per run, the simulated time to reach three target eval losses (by default the losses
(a) reaches after a quarter, half and all of its rounds; ``--targets`` to choose) and the
speed-up over (a) at each (``-`` where a run never gets there), the final eval loss and
Rouge-L, the mean simulated round time and the mean share of base-model parameters the
devices kept; then the bandit's arm choices per tier. Writes
``benchmarks/results/bandit.json``. About 65 minutes on 2 CPU cores; keep the machine
otherwise idle (compute times are measured).

    .venv/bin/python benchmarks/bandit.py [--rounds 8] [--out runs/bandit] [--only NAME ...]
        [--reuse]   # read the runs already finished in --out instead of running them again
        [--quick]   # tiny model (4 layers), 3 devices, 2 rounds: (a) and (c) only
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from _bench import QUICK_OVERRIDES, QUICK_TITLE, REPO, add_quick, results_path, simulate_cli

QUICK = [*QUICK_OVERRIDES, "model.tiny_layers=4", "federation.num_clients=3",
         "federation.min_clients=3", "eval.validation_examples=4"]  # fmt: skip
GRID = [(0.0, 8), (0.5, 8), (0.75, 4)]  # the scenario's arms


def runs() -> dict[str, list[str]]:
    """Overrides of every run, by name."""
    out = {}
    for ratio, rank in GRID:
        name = "(a) no pruning r8" if ratio == 0 else f"fixed {ratio}/{rank}"
        out[name] = [f"strategy.options.arms=[[{ratio}, {float(rank)}]]"]
    out["(c) bandit sw-ucb"] = []
    out["(c2) bandit, 2 arms"] = ["strategy.options.arms=[[0.0, 8.0], [0.75, 4.0]]"]
    from fedpeft.devices import assign_profiles

    ids = [str(i) for i in range(12)]
    tx2 = [
        c for c, p in assign_profiles(ids, ["tx2", "xavier-nx", "agx"]).items() if p.name == "tx2"
    ]
    pins = ",".join(f'"{c}"={len(GRID) - 1}.0' for c in tx2)
    out["(o) pinned tx2 0.75/4"] = [
        'strategy.options.bandit="pinned"',
        f"strategy.options.bandit_options={{{pins}}}",
    ]
    return out


def run(
    name: str, extra: list[str], rounds: int, root: Path, reuse: bool, quick: bool = False
) -> list[dict[str, Any]]:
    """One simulation through the CLI (or, with ``reuse``, a finished one); its metrics rows."""
    out = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "-")
    done = out / "summary.json"
    if reuse and done.exists():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if len(rows) == rounds + 1:
            return rows
    rounds_set = [f"federation.rounds={rounds}"]
    simulate_cli("fedspine.toml", out, [*extra, *(QUICK if quick else []), *rounds_set])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def time_to(rows: list[dict[str, Any]], target: float) -> float | None:
    """Simulated seconds until the first evaluated round at or below ``target``."""
    for r in rows[1:]:
        if r.get("eval_loss") is not None and r["eval_loss"] <= target:
            return float(r["sim_wall_s"])
    return None


def tiers_of(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each client's device tier, as the coordinator assigned them (round-robin by id)."""
    from fedpeft.devices import assign_profiles

    ids = sorted({c for r in rows[1:] for c in r["client_ids"]})
    return {c: p.name for c, p in assign_profiles(ids, ["tx2", "xavier-nx", "agx"]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--targets", nargs="*", type=float, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "bandit"))
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the run names")
    ap.add_argument("--reuse", action="store_true", help="read runs already finished in --out")
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.only = 2, args.only or ["(a) no pruning r8", "(c) bandit sw-ucb"]
    results: dict[str, list[dict[str, Any]]] = {}
    for name, extra in runs().items():
        if args.only and name not in args.only:
            continue
        results[name] = run(name, extra, args.rounds, Path(args.out), args.reuse, args.quick)
        print(f"done: {name}", file=sys.stderr, flush=True)
    ref = results.get("(a) no pruning r8", [])
    if args.targets:
        targets = list(args.targets)
    else:
        n = len(ref) - 1
        targets = [
            ref[max(1, n // 4)]["eval_loss"],
            ref[max(1, n // 2)]["eval_loss"],
            ref[n]["eval_loss"],
        ]
    base = [time_to(ref, t) for t in targets]
    print(
        f"\n{QUICK_TITLE if args.quick else 'SmolLM2-135M'}, WordNet by domain, "
        f"{3 if args.quick else 12} clients (tiers tx2 / xavier-nx / agx) x "
        f"{args.rounds} rounds x 4 local steps; eval loss before "
        f"{next(iter(results.values()))[0]['eval_loss']:.4f}; simulated seconds to reach eval "
        f"loss {' / '.join(f'{t:.3f}' for t in targets)} (speed-up vs (a))"
    )
    head = f"{'run':<20}" + "".join(f"{'t->' + format(t, '.2f'):>17}" for t in targets)
    print(head + f"{'final loss':>11}{'Rouge-L':>8}{'round s':>8}{'params kept':>12}")
    table = {}
    for name, rows in results.items():
        times = [time_to(rows, t) for t in targets]
        speed = [b / t if (b is not None and t) else None for b, t in zip(base, times, strict=True)]
        cells = "".join(
            f"{'-':>17}" if t is None else f"{t:>10.1f} ({s:.2f}x)" if s else f"{t:>17.1f}"
            for t, s in zip(times, speed, strict=True)
        )
        trained = rows[1:]
        round_s = sum(r["sim_round_s"] for r in trained) / len(trained)
        kept = sum(r.get("fedspine_params_mean", 1.0) for r in trained) / len(trained)
        last = rows[-1]
        table[name] = {
            "time_to_targets_s": times,
            "speedup_vs_a": speed,
            "final_eval_loss": last["eval_loss"],
            "final_rougeL": last.get("eval_rougeL"),
            "mean_round_s": round_s,
            "params_kept": kept,
        }
        print(
            f"{name:<20}{cells}{last['eval_loss']:>11.4f}"
            f"{last.get('eval_rougeL', float('nan')):>8.4f}{round_s:>8.1f}{kept:>12.3f}"
        )
    for name in ("(c) bandit sw-ucb", "(c2) bandit, 2 arms"):
        if name in results:
            arm_choices(name, results[name])
    blob = {"rounds": args.rounds, "targets": targets, "table": table, "rows": results}
    results_path("bandit.json").write_text(json.dumps(blob, indent=2))


def arm_choices(name: str, rows: list[dict[str, Any]]) -> None:
    """Print a bandit run's arm choices per tier, first half | second half of the rounds."""
    tiers = tiers_of(rows)
    print(f"\n{name}: arm choices (ratio/rank) per tier, first half | second half of the rounds")
    half = len(rows[1:]) // 2
    for tier in ("tx2", "xavier-nx", "agx"):
        parts = []
        for part in (rows[1 : 1 + half], rows[1 + half :]):
            c = Counter(
                f"{r[f'arm_ratio/{cid}']}/{int(r[f'arm_rank/{cid}'])}"
                for r in part for cid in r["client_ids"] if tiers[cid] == tier
            )  # fmt: skip
            parts.append(", ".join(f"{k} x{v}" for k, v in sorted(c.items())))
        print(f"  {tier:<10} {parts[0]:<34} | {parts[1]}")


if __name__ == "__main__":
    main()
