"""Attacks against defences on the WordNet task: final eval loss, clean vs attacked vs defended.

The tiny LLaMA built in code (``simulations/tiny.toml``) on the real WordNet task, 10 clients
split by domain, 20 % of them attackers (the same 2 every round), every client every round,
6 rounds of 8 local AdamW steps. Each LoRA attack of ``[attack]`` against each defence of
``[robust]``:

- ``none`` (FedAvg as it is, with the coordinator's validation, which is always on);
- ``clip``: ``robust.clip_norm`` = the largest honest change norm seen in the clean run;
- ``median``, ``trimmed_mean`` (0.2), ``multikrum`` (f = 2).

Seed/scalar: FedKSeed (``simulations/tiny_fedkseed.toml``, 10 clients) with malicious
scalars (sign flipped x4, scaled x100) against ``robust.scalar_clip`` (the largest honest
|scalar| of the clean run) and the per-seed trimmed mean.

Prints a table of final eval loss per attack and defence, the best defence's loss relative to
the clean run, and whether it is within the goal (5 % relative), and writes
``benchmarks/results/attacks.json``. About 15 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/attacks.py [--rounds 6] [--out runs/attacks]
        [--quick]   # 1 round, 5 clients, 2 attacks x 2 defences, 1 scalar attack
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _bench import QUICK_OVERRIDES, REPO, add_quick, results_path

from fedpeft.cache import ProcessCache
from fedpeft.config.load import load_config
from fedpeft.simulation.runner import simulate

ATTACKS = {
    "sign_flip x4": ["attack.kind=sign_flip", "attack.scale=4"],
    "scale x20": ["attack.kind=scale", "attack.scale=20"],
    "noise sd 1": ["attack.kind=noise", "attack.noise_std=1"],
    "label_flip": ["attack.kind=label_flip"],
    "alie": ["attack.kind=alie"],
    "nonfinite": ["attack.kind=nonfinite"],
    "inflate_examples": ["attack.kind=inflate_examples"],
}
ZO_ATTACKS = {
    "scalars -x4": ["attack.kind=sign_flip", "attack.scale=4"],
    "scalars x100": ["attack.kind=scale", "attack.scale=100"],
}


def _run(scenario: str, overrides: list[str], out: Path, cache: ProcessCache) -> dict[str, Any]:
    cfg = load_config(REPO / "simulations" / scenario, overrides)
    t0 = time.perf_counter()
    summary = simulate(cfg, out, quiet=True, cache=cache)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "eval_loss": summary["after"]["eval_loss"],
        "rejected": sum(sum(r.get("rejected", {}).values()) for r in rows),
        "capped": sum(r.get("weights_capped", 0) for r in rows),
        "norm_max": max((r.get("robust_norm_max", 0.0) for r in rows), default=0.0),
        "scalar_max": max((r.get("robust_scalar_max", 0.0) for r in rows), default=0.0),
        "wall_s": time.perf_counter() - t0,
    }


def _table(title: str, clean: float, grid: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    defences = list(next(iter(grid.values())))
    head = f"{title:18}" + "".join(f"{d:>13}" for d in defences) + "   best / clean  goal"
    lines = [head, f"{'clean':18}{clean:>13.4f}"]
    for attack, cells in grid.items():
        losses = {d: c["eval_loss"] for d, c in cells.items()}
        best = min(losses, key=lambda d: losses[d])
        ratio = losses[best] / clean
        row = f"{attack:18}" + "".join(f"{losses[d]:>13.4f}" for d in defences)
        lines.append(row + f"   {best:>12} {ratio:5.3f}  {'yes' if ratio <= 1.05 else 'NO'}")
    return lines


def main() -> None:
    """Run every cell and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="runs/attacks")
    add_quick(ap)
    args = ap.parse_args()
    attacks, zo_attacks, keep = ATTACKS, ZO_ATTACKS, None
    if args.quick:
        attacks = {k: ATTACKS[k] for k in ("sign_flip x4", "nonfinite")}
        zo_attacks = {"scalars x100": ZO_ATTACKS["scalars x100"]}
        keep = {"none", "median", "scalar_clip"}
    out, cache = Path(args.out), ProcessCache()
    base = [
        "federation.num_clients=10",
        f"federation.rounds={args.rounds}",
        "federation.min_clients=2",
        "attack.fraction=0.2",
        "eval.examples=64",
        "eval.every=0",
        *(QUICK_OVERRIDES if args.quick else []),
        *(["federation.num_clients=5", "train.local_steps=2"] if args.quick else []),
    ]
    clean = _run("tiny.toml", [*base, "robust.clip_norm=1e9"], out / "clean", cache)
    defences: dict[str, list[str]] = {
        "none": [],
        "clip": [f"robust.clip_norm={clean['norm_max']:.6g}"],
        "median": ["robust.rule=median"],
        "trimmed_mean": ["robust.rule=trimmed_mean", "robust.trim_fraction=0.2"],
        "multikrum": ["robust.rule=multikrum", "robust.byzantine=2"],
    }
    defences = {d: o for d, o in defences.items() if keep is None or d in keep}
    grid: dict[str, dict[str, dict[str, Any]]] = {}
    for attack, a_over in attacks.items():
        grid[attack] = {}
        for defence, d_over in defences.items():
            name = f"{attack}-{defence}".replace(" ", "_")
            grid[attack][defence] = _run("tiny.toml", [*base, *a_over, *d_over], out / name, cache)
            print(
                f"  {attack:18} {defence:13} {grid[attack][defence]['eval_loss']:.4f}", flush=True
            )
    clean_defended = {
        d: _run("tiny.toml", [*base, *o], out / f"clean-{d}", cache)["eval_loss"]
        for d, o in defences.items()
        if d != "none"
    }
    zo_base = [*base, "zo.local_steps=10"]
    zo_clean = _run(
        "tiny_fedkseed.toml", [*zo_base, "robust.scalar_clip=1e9"], out / "zo-clean", cache
    )
    zo_clip = zo_clean["scalar_max"]
    zo_def = {
        "none": [],
        "scalar_clip": [f"robust.scalar_clip={zo_clip:.6g}"],
        "trimmed_mean": ["robust.rule=trimmed_mean", "robust.trim_fraction=0.2"],
    }
    zo_def = {d: o for d, o in zo_def.items() if keep is None or d in keep}
    zo_grid: dict[str, dict[str, dict[str, Any]]] = {}
    for attack, a_over in zo_attacks.items():
        zo_grid[attack] = {
            d: _run("tiny_fedkseed.toml", [*zo_base, *a_over, *o], out / f"zo-{attack}-{d}", cache)
            for d, o in zo_def.items()
        }
    lines = _table("LoRA (fedavg)", clean["eval_loss"], grid)
    lines.append(
        "clean + defence   "
        + f"{clean['eval_loss']:>13.4f}"
        + "".join(f"{clean_defended[d]:>13.4f}" for d in list(defences)[1:])
    )
    lines += [""] + _table("FedKSeed", zo_clean["eval_loss"], zo_grid)
    print("\n".join(lines))
    result = {
        "clean": clean,
        "clip_norm": clean["norm_max"],
        "lora": grid,
        "clean_defended": clean_defended,
        "zo_clean": zo_clean,
        "zo": zo_grid,
        "zo_clip": zo_clip,
        "table": lines,
    }
    path = results_path("attacks.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
