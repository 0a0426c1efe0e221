"""Seed/scalar training vs federated LoRA vs the centralized reference, same forward passes.

Runs, one after the other, on SmolLM2-135M and the WordNet task split by domain over 4
clients for 2 rounds, each client-round spending the same number of forward passes (40 by
default; a FedKSeed step costs 2, a first-order step 1 plus its backward pass):

- ``fedkseed``, ``fedkseed-pro`` and ``sparse-mezo`` (every parameter, 20 ZO steps per
  client-round; Sparse MeZO's directions move each tensor's smallest-magnitude quarter);
- ``ferret`` (every parameter, 40 SGD steps, 1024 projection coefficients uploaded);
- ``fedavg`` LoRA r=8 (FedIT, 40 AdamW steps) and its ``centralized`` reference.

Prints eval loss and Rouge-L before/after, bytes per client-round and wall time, and writes
``benchmarks/results/zo_compare.json``. About 45 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/zo_compare.py [--forwards 40] [--out runs/zo_compare] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _bench import QUICK_OVERRIDES, QUICK_TITLE, REPO, add_quick, results_path, simulate_cli

COMMON = [
    "federation.num_clients=4",
    "rounds=2",
    "federation.min_clients=2",
    "data.max_examples_per_client=400",
]


def runs(forwards: int) -> dict[str, tuple[str, list[str]]]:
    """Scenario and overrides of each method, at ``forwards`` forward passes per client-round."""
    zo = [f"zo.local_steps={forwards // 2}"]
    fo = [f"train.local_steps={forwards}"]
    return {
        "fedkseed": ("fedkseed.toml", zo),
        "fedkseed-pro": ("fedkseed.toml", [*zo, "strategy.name=fedkseed-pro"]),
        "sparse-mezo": ("fedkseed.toml", [*zo, "strategy.name=sparse-mezo"]),
        "ferret": ("ferret.toml", fo),
        "fedavg-lora": ("default.toml", [*fo, "eval.metric_every=0"]),
        "centralized-lora": ("centralized.toml", [*fo, "federation.min_clients=1"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forwards", type=int, default=40, help="forward passes per client-round")
    ap.add_argument("--out", default=str(REPO / "runs" / "zo_compare"))
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the method names")
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.forwards, args.only = 4, args.only or ["fedkseed", "ferret", "fedavg-lora"]
    results = {}
    for name, (toml, extra) in runs(args.forwards).items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / name
        simulate_cli(toml, out, [*COMMON, *extra, *(QUICK_OVERRIDES if args.quick else [])])
        results[name] = json.loads((out / "summary.json").read_text())
    metric = "eval_rougeL"
    print(
        f"\n{QUICK_TITLE if args.quick else 'SmolLM2-135M'}, WordNet by domain, 4 clients x "
        f"{1 if args.quick else 2} rounds, "
        f"{args.forwards} forward passes per client-round"
    )
    print(
        f"{'method':<18}{'loss before':>12}{'loss after':>11}{'Rouge-L before':>15}{'after':>7}"
        f"{'up B/cl-rnd':>13}{'down B/cl-rnd':>15}{'wall s':>8}"
    )
    for name, s in results.items():
        b, a = s["before"], s["after"]
        up, down = s["bytes_up_per_client_round"], s["bytes_down_per_client_round"]
        print(
            f"{name:<18}{b['eval_loss']:>12.4f}{a['eval_loss']:>11.4f}"
            f"{b.get(metric, 0):>15.4f}{a.get(metric, 0):>7.4f}"
            f"{up:>13.0f}{down:>15.0f}{s['wall_s']:>8.0f}"
        )
    results_path("zo_compare.json").write_text(
        json.dumps({"forwards": args.forwards, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
