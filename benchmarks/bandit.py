"""FedSpine as its paper measures it: each device's own model, under memory budgets, against
baselines at the same sparsity.

``simulations/fedspine.toml`` (SmolLM2-135M, WordNet split by domain, 12 clients, every client
every round, the round waiting for the slowest) on three simulated device tiers that this
script writes as a devices file: 4 TX2-, 4 Xavier-NX- and 4 AGX-shaped devices (compute 6x,
3x and 1x this machine's measured time, plus bytes over their links), with memory budgets
that make the unpruned model infeasible on the TX2s (``--tx2-mb``, below the peak of a round
on the whole model and above that of the less pruned arms; the others keep their profiles'
8 and 32 GiB). Every run uses the ``fedspine`` strategy (masked averaging; with one
structure for everyone it is FedAvg of the factors):

- ``(i) least pruning that fits``: each device fixed at the least pruned arm its memory
  allows (TX2: the first pruned arm, others: unpruned), pruned once by the coordinator
  (magnitude of the base weights: a TX2 cannot hold the whole model to score it), then
  federated LoRA;
- ``(ii) prune once, all``: every device at the TX2s' ratio, pruned once at the start by
  magnitude, then federated LoRA with no further pruning (one small model for everyone);
- ``(iii) FedSpine pooled``: the bandit over every arm, arm quality pooled over devices and
  speed per device (``pooled-ucb``, the default); ``(iii) FedSpine sw-ucb``: the per-device
  sliding-window UCB instead;
- ``(iv) per-tier pick`` (only with ``--only``): no learning, TX2s at the most pruned arm,
  everyone else unpruned. The oracle per tier is the best fixed arm of each tier; with
  device-model quality falling as the ratio grows (measured), that is (i) on this grid, so
  (iv) is the other candidate, not run by default.

What is measured is each device's own deployed model (its structure with its rank slice of
the global adapter, ``device_eval_loss``), not the global adapter on the unpruned model.
Prints, per run, the simulated seconds until the mean device-model loss (and the TX2 tier's)
first reaches each target (by default what the best baseline, (i) or (ii), reaches after half
and after all of its rounds) with the speed-up over that baseline, the final device-model loss
per tier, the final device-model Rouge-L (mean and TX2), the share of base parameters the
devices keep in the last round and the mean simulated round time; then each learner's arm
choices per tier. Writes ``benchmarks/results/bandit.json``. About 100 minutes on 2 CPU cores;
keep the machine otherwise idle (compute times are measured).

    .venv/bin/python benchmarks/bandit.py [--rounds 6] [--out runs/bandit] [--only NAME ...]
        [--tx2-mb 700] [--reuse]   # read runs already finished in --out
        [--quick]   # tiny model (4 layers), 3 devices, 2 rounds: (i) and (iii) pooled only
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
GRID = [(0.0, 8), (0.25, 8), (0.5, 8)]  # the arms: (ratio, rank)
TIERS = ("tx2", "xavier-nx", "agx")
BASELINES = ("(i) least pruning that fits", "(ii) prune once, all")


def arms_option(grid: list[tuple[float, int]]) -> str:
    """The ``strategy.options.arms`` override of ``grid``."""
    return "strategy.options.arms=[" + ", ".join(f"[{r}, {float(k)}]" for r, k in grid) + "]"


def pinned(pins: dict[str, int]) -> list[str]:
    """Overrides that pin each device to an arm index."""
    body = ",".join(f'"{c}"={float(i)}' for c, i in sorted(pins.items()))
    return ['strategy.options.bandit="pinned"', f"strategy.options.bandit_options={{{body}}}"]


def tiers_of(ids: list[str]) -> dict[str, str]:
    """Each client's tier: round-robin over the sorted ids, as ``devices.tiers`` assigns."""
    from fedpeft.devices import assign_profiles

    return {c: p.name for c, p in assign_profiles(ids, list(TIERS)).items()}


def devices_file(path: Path, n: int, tx2_mb: float) -> Path:
    """Write the devices file: the tier profiles, the TX2s' memory set to ``tx2_mb``."""
    from fedpeft.devices import TIERS as PROFILES

    out = {}
    for cid, tier in tiers_of([str(i) for i in range(n)]).items():
        p = PROFILES[tier]
        memory = tx2_mb if tier == "tx2" else p.memory_mb
        out[cid] = {"name": tier, "speed": p.speed, "up_mbps": p.up_mbps,
                    "down_mbps": p.down_mbps, "memory_mb": memory}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return path


def runs(n: int) -> dict[str, list[str]]:
    """Overrides of every run, by name."""
    ids = [str(i) for i in range(n)]
    tx2 = [c for c, t in tiers_of(ids).items() if t == "tx2"]
    fits = 1  # the least pruned arm a TX2's budget allows (the whole model does not)
    grid = arms_option(GRID)
    magnitude = 'strategy.options.start="magnitude"'
    return {
        BASELINES[0]: [grid, magnitude, *pinned({c: fits for c in tx2})],
        BASELINES[1]: [grid, magnitude, *pinned({c: fits for c in ids})],
        "(iii) FedSpine pooled": [
            grid,
            'strategy.options.bandit="pooled-ucb"',
            "strategy.options.bandit_options={c=0.5}",
        ],  # fmt: skip
        "(iii) FedSpine sw-ucb": [
            grid,
            'strategy.options.bandit="sw-ucb"',
            "strategy.options.bandit_options={c=0.5}",
        ],  # fmt: skip
        "(iv) per-tier pick": [grid, magnitude, *pinned({c: len(GRID) - 1 for c in tx2})],
    }


DEFAULT = [*BASELINES, "(iii) FedSpine pooled", "(iii) FedSpine sw-ucb"]  # (iv): --only


def run(
    name: str, extra: list[str], rounds: int, root: Path, reuse: bool, quick: bool = False
) -> list[dict[str, Any]]:
    """One simulation through the CLI (or, with ``reuse``, a finished one); its metrics rows."""
    out = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    done = out / "summary.json"
    if reuse and done.exists():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if len(rows) == rounds + 1:
            return rows
    rounds_set = [f"federation.rounds={rounds}"]
    simulate_cli("fedspine.toml", out, [*extra, *(QUICK if quick else []), *rounds_set])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def device_loss(row: dict[str, Any], tier: str | None) -> float | None:
    """The mean device-model loss of ``row`` (over all devices, or one tier's)."""
    if tier is None:
        return row.get("device_eval_loss_mean")
    return row.get("device_eval_loss_tier", {}).get(tier)


def time_to(rows: list[dict[str, Any]], target: float, tier: str | None) -> float | None:
    """Simulated seconds until the first evaluated round at or below ``target``."""
    for r in rows[1:]:
        got = device_loss(r, tier)
        if got is not None and got <= target:
            return float(r["sim_wall_s"])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument(
        "--targets", nargs="*", type=float, default=None,
        help="mean device-model losses to time (default: the best baseline's)",
    )  # fmt: skip
    ap.add_argument("--tx2-mb", type=float, default=700.0, help="the TX2s' memory budget")
    ap.add_argument("--out", default=str(REPO / "runs" / "bandit"))
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the run names")
    ap.add_argument("--reuse", action="store_true", help="read runs already finished in --out")
    add_quick(ap)
    args = ap.parse_args()
    n = 3 if args.quick else 12
    if args.quick:
        args.rounds = 2
        args.only = args.only or [BASELINES[0], "(iii) FedSpine pooled"]
        args.tx2_mb = 1e6  # (the tiny model's footprint says nothing about SmolLM2's)
    args.only = args.only or DEFAULT
    devices = devices_file(Path(args.out) / "devices.json", n, args.tx2_mb)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, extra in runs(n).items():
        if args.only and name not in args.only:
            continue
        extra = [*extra, f"devices.file={str(devices)!r}"]
        results[name] = run(name, extra, args.rounds, Path(args.out), args.reuse, args.quick)
        print(f"done: {name}", file=sys.stderr, flush=True)
    table = report(results, args)
    blob = {"rounds": args.rounds, "tx2_mb": args.tx2_mb, "grid": GRID, **table,
            "rows": results}  # fmt: skip
    results_path("bandit.json").write_text(json.dumps(blob, indent=2))


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table; return it (with the targets and the reference baseline)."""
    base = [b for b in BASELINES if b in results]
    ref_name = min(base, key=lambda b: results[b][-1]["device_eval_loss_mean"]) if base else ""
    ref = results.get(ref_name, [])
    if args.targets:
        targets = list(args.targets)
    elif ref:
        targets = [ref[max(1, (len(ref) - 1) // 2)]["device_eval_loss_mean"],
                   ref[-1]["device_eval_loss_mean"]]  # fmt: skip
    else:
        targets = []
    first = next(iter(results.values()))
    print(
        f"\n{QUICK_TITLE if args.quick else 'SmolLM2-135M'}, WordNet by domain, "
        f"{len(first[1]['client_ids'])} clients (tiers {' / '.join(TIERS)}; TX2 memory "
        f"{args.tx2_mb:g} MiB) x {args.rounds} rounds; arms {GRID}. Device-model loss: each "
        f"device's own pruned model with its slice of the global adapter (before training "
        f"{first[0]['eval_loss']:.4f}, the base model). Simulated seconds until the mean over "
        f"devices / the TX2 tier first reaches each target (speed-up vs {ref_name or '-'})"
    )
    head = f"{'run':<30}"
    for t in targets:
        head += f"{'all ->' + format(t, '.3f'):>17}{'tx2 ->' + format(t, '.3f'):>17}"
    head += "".join(f"{'loss ' + t[:4]:>10}" for t in TIERS)
    print(head + f"{'R-L mean':>9}{'R-L tx2':>8}{'kept':>6}{'round s':>8}")
    table = {}
    for name, rows in results.items():
        cells, times = "", {}
        for t in targets:
            for tier in (None, "tx2"):
                got, want = time_to(rows, t, tier), time_to(ref, t, tier)
                times[f"{tier or 'all'}->{t:.4f}"] = got
                if got is None:
                    cells += f"{'-':>17}"
                elif want:
                    cells += f"{got:>9.1f} ({want / got:.2f}x)"
                else:
                    cells += f"{got:>17.1f}"
        last, trained = rows[-1], rows[1:]
        tiers = last.get("device_eval_loss_tier", {})
        rouge = last.get("device_eval_rougeL_tier", {})
        table[name] = {
            "time_to_targets_s": times,
            "final_device_loss_mean": last.get("device_eval_loss_mean"),
            "final_device_loss_tier": tiers,
            "final_device_rougeL_mean": last.get("device_eval_rougeL_mean"),
            "final_device_rougeL_tier": rouge,
            "final_global_eval_loss": last["eval_loss"],
            "params_kept_last_round": last.get("fedspine_params_mean", 1.0),
            "mean_round_s": sum(r["sim_round_s"] for r in trained) / len(trained),
            "failed_pulls": sum(r.get("fedspine_failed_pulls", 0.0) for r in trained),
        }
        row = table[name]
        losses = "".join(f"{tiers.get(t, float('nan')):>10.4f}" for t in TIERS)
        print(
            f"{name:<30}{cells}{losses}{row['final_device_rougeL_mean'] or float('nan'):>9.4f}"
            f"{rouge.get('tx2', float('nan')):>8.4f}{row['params_kept_last_round']:>6.3f}"
            f"{row['mean_round_s']:>8.1f}"
        )
    for name in results:
        if "FedSpine" in name:
            arm_choices(name, results[name])
    return {"targets": targets, "reference": ref_name, "table": table}


def arm_choices(name: str, rows: list[dict[str, Any]]) -> None:
    """Print a bandit run's arm choices per tier, first half | second half of the rounds."""
    tiers = tiers_of(sorted({c for r in rows[1:] for c in r["client_ids"]}))
    print(f"\n{name}: arm choices (ratio/rank) per tier, first half | second half of the rounds")
    half = len(rows[1:]) // 2
    for tier in TIERS:
        parts = []
        for part in (rows[1 : 1 + half], rows[1 + half :]):
            c = Counter(
                f"{r[f'arm_ratio/{cid}']}/{int(r[f'arm_rank/{cid}'])}"
                for r in part for cid in r["client_ids"]
                if tiers.get(cid) == tier and f"arm_ratio/{cid}" in r
            )  # fmt: skip
            parts.append(", ".join(f"{k} x{v}" for k, v in sorted(c.items())))
        print(f"  {tier:<10} {parts[0]:<40} | {parts[1]}")


if __name__ == "__main__":
    main()
