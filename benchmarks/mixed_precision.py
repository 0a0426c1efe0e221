"""What mixing quantized and full-precision nodes does to the global adapter.

The default scenario (SmolLM2-135M, 8 clients, WordNet, FedAvg) three times, each in its own
process, differing only in the base model the *nodes* train on: every node float32; even
nodes nf4 and odd nodes float32 (``simulation.node_quantization = ['nf4', 'none']``); every
node nf4. The coordinator holds the float32 base in all three, so every row's eval loss is the
global adapter's on the same float32 model: the cost of training parts (or all) of the
federation against a 4-bit copy of it.

    .venv/bin/python benchmarks/mixed_precision.py [--rounds 5] [--quick]

(the loss only: no generation metric, ``data.metric = none``)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from _bench import QUICK_OVERRIDES, add_quick, results_path, simulate_cli

from fedpeft.report.runs import load_run

RUNS: dict[str, list[str]] = {
    "all float32": [],
    "half nf4": ["simulation.node_quantization=['nf4', 'none']"],
    "all nf4": ["simulation.node_quantization=['nf4']"],
}


def _summary(out: Path) -> dict[str, Any]:
    rows = load_run(out).rows
    losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    last = rows[-1]
    return {
        "loss_before": losses[0],
        "loss_after": losses[-1],
        "losses": losses,
        "peak_mem_mib": last.get("client_peak_mem_mb", {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    add_quick(ap)
    args = ap.parse_args()
    base = ["model.node_quantizations=['nf4']", f"federation.rounds={args.rounds}",
            "data.metric=none"]  # fmt: skip
    if args.quick:
        base += [*QUICK_OVERRIDES, "federation.num_clients=4", "federation.partition=iid"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            out = Path(tmp) / name.replace(" ", "_")
            simulate_cli("default.toml", out, [*base, *extra])
            results[name] = _summary(out)
    ref = results["all float32"]
    gain = ref["loss_before"] - ref["loss_after"]
    print(f"\nglobal adapter on the float32 base, {args.rounds} rounds; nodes trained on:")
    print(f"{'nodes':<14}{'loss before':>12}{'loss after':>11}{'gain vs float32':>17}"
          f"{'client peak MiB (min-max)':>28}")  # fmt: skip
    for name, r in results.items():
        peaks = list(r["peak_mem_mib"].values()) or [0.0]
        share = (r["loss_before"] - r["loss_after"]) / gain if gain else float("nan")
        print(f"{name:<14}{r['loss_before']:>12.4f}{r['loss_after']:>11.4f}{share:>16.1%}"
              f"{min(peaks):>16.0f} - {max(peaks):<9.0f}")  # fmt: skip
    results_path("mixed_precision.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
