"""Heterogeneous LoRA ranks and compressed updates on the real model, side by side.

SmolLM2-135M on the WordNet task split by domain over 4 clients with ranks 2/4/8/16
(``ranks.mode = "tiers"``), 4 rounds of 5 local AdamW steps, every client every round:

- strategies ``hetlora`` (self-pruning on, lambda 1e-3), ``hetlora`` with FedIT weights and
  no pruning (zero-padded FedAvg), ``flexlora``, ``flora``, ``ffa``, ``rolora``; ``fedavg``
  at rank 8 for all (the homogeneous FedIT baseline) and the ``centralized`` rank-8
  reference with the same optimizer steps;
- codecs on ``fedavg`` rank 8: upload ``fp16``, ``int8``, ``topk`` and ``compeft`` (10 % kept,
  error feedback on), and ``int8`` both ways, against no codec.

Prints two tables (final eval loss, Rouge-L, bytes per client-round, wall time; codec x
bytes and eval-loss change) and writes ``benchmarks/results/hetero.json``. About 45 minutes
on 2 CPU cores.

    .venv/bin/python benchmarks/hetero.py [--rounds 4] [--out runs/hetero] [--only NAME ...]
        [--quick]   # tiny model, 1 round, three runs: fedavg, flora, codec int8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _bench import QUICK_OVERRIDES, QUICK_TITLE, REPO, add_quick, results_path, simulate_cli

QUICK_RUNS = ["fedavg r8 (all)", "flora", "codec int8"]
TIERS = "ranks.tiers=[2,4,8,16]"


def common(rounds: int) -> list[str]:
    """Overrides every run shares."""
    return [
        "federation.num_clients=4",
        f"rounds={rounds}",
        "federation.min_clients=4",
        "eval.every=0",
        "eval.metric_every=0",
    ]


def runs() -> dict[str, tuple[str, list[str]]]:
    """Scenario file and overrides of every run, by name."""
    mixed = ["ranks.mode=tiers", TIERS]
    out: dict[str, tuple[str, list[str]]] = {
        "fedavg r8 (all)": ("default.toml", []),
        "centralized r8": ("centralized.toml", ["federation.min_clients=1"]),
        "fedavg zero-pad": (
            "default.toml",
            [*mixed, "strategy.name=hetlora", 'strategy.options={"weighting"="examples"}'],
        ),
        "hetlora": (
            "default.toml",
            [*mixed, "strategy.name=hetlora", 'strategy.options={"reg_lambda"=0.001}'],
        ),
        "flexlora": ("default.toml", [*mixed, "strategy.name=flexlora"]),
        "flora": ("default.toml", [*mixed, "strategy.name=flora"]),
        "ffa": ("default.toml", [*mixed, "strategy.name=ffa"]),
        "rolora": ("default.toml", [*mixed, "strategy.name=rolora"]),
    }
    for codec in ("fp16", "int8", "topk", "compeft"):
        out[f"codec {codec}"] = ("default.toml", [f"compress.up={codec}", "compress.ratio=0.1"])
    out["codec int8 both"] = ("default.toml", ["compress.up=int8", "compress.down=int8"])
    return out


def run(name: str, toml: str, extra: list[str], rounds: int, root: Path,
        quick: bool = False) -> dict[str, object]:  # fmt: skip
    """One simulation through the CLI; its summary."""
    out = root / name.replace(" ", "_").replace("(", "").replace(")", "")
    simulate_cli(toml, out, [*common(rounds), *extra, *(QUICK_OVERRIDES if quick else [])])
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "runs" / "hetero"))
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the run names")
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.only = 1, args.only or QUICK_RUNS
    results: dict[str, dict[str, object]] = {}
    for name, (toml, extra) in runs().items():
        if args.only and name not in args.only:
            continue
        results[name] = run(name, toml, extra, args.rounds, Path(args.out), args.quick)
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(
        f"\n{QUICK_TITLE if args.quick else 'SmolLM2-135M'}, WordNet by domain, "
        f"4 clients x {args.rounds} rounds x 5 local steps; "
        "mixed runs use ranks 2/4/8/16"
    )
    head = f"{'run':<18}{'eval loss':>10}{'Rouge-L':>9}{'up B/cl-rnd':>13}{'down B/cl-rnd':>15}"
    print(head + f"{'wall s':>8}")
    base = results.get("fedavg r8 (all)")
    for name, s in results.items():
        after = s["after"]
        assert isinstance(after, dict)
        print(
            f"{name:<18}{after['eval_loss']:>10.4f}{after.get('eval_rougeL', 0.0):>9.4f}"
            f"{s['bytes_up_per_client_round']:>13.0f}{s['bytes_down_per_client_round']:>15.0f}"
            f"{s['wall_s']:>8.0f}"
        )
    if base is not None:
        b_after = base["after"]
        assert isinstance(b_after, dict)
        print("\ncodecs on fedavg r8 (upload payload = encoded tensor bytes)")
        print(f"{'codec':<18}{'payload up':>12}{'x smaller':>10}{'eval loss':>10}{'change':>9}")
        ref_up = float(base["payload_up_per_client_round"])  # type: ignore[arg-type]
        for name, s in results.items():
            if not (name.startswith("codec") or name == "fedavg r8 (all)"):
                continue
            after = s["after"]
            assert isinstance(after, dict)
            up = float(s["payload_up_per_client_round"])  # type: ignore[arg-type]
            change = after["eval_loss"] - b_after["eval_loss"]
            label = "none" if name == "fedavg r8 (all)" else name.removeprefix("codec ")
            print(
                f"{label:<18}{up:>12.0f}{ref_up / up:>10.1f}{after['eval_loss']:>10.4f}"
                f"{change:>+9.4f}"
            )
    blob = {"rounds": args.rounds, "results": results}
    results_path("hetero.json").write_text(json.dumps(blob, indent=2))


if __name__ == "__main__":
    main()
