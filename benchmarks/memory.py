"""Peak memory of the in-process backend as virtual clients grow, on one shared base model.

Runs one round of real LoRA training (1 local step, batch 2) with 1, 10 and 100 virtual
clients on the same base model, each in a fresh process, and prints the peak RSS side by side.
Every client adds only its tokenized data and nothing per model: the base model is loaded
once per process and clients switch adapter weights.

    .venv/bin/python benchmarks/memory.py [--model smollm2-135m] [--clients 1 10 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from _bench import REPO, add_quick, results_path
from _measure import run_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF id/path")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.model, args.clients = "tiny", [1, 3]
    results = {}
    for n in args.clients:
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
                "--config", str(REPO / "simulations" / "tiny.toml"), "--out", out,
                f"model.name={args.model}", f"federation.num_clients={n}", "rounds=1",
                "federation.partition=iid", "federation.min_clients=1",
                "data.max_examples_per_client=16",
                "train.local_steps=1", "train.batch_size=2", "train.max_seq_len=48",
                "lora.rank=8", "eval.every=0", "eval.examples=4", "data.metric=none",
            ]  # fmt: skip
            m = run_measured(cmd)
            if m.returncode != 0:
                sys.exit(f"{n} clients failed:\n{m.tail}")
            results[n] = {"peak_rss_mib": m.peak_rss_mib, "wall_s": m.wall_s}
    first = results[args.clients[0]]["peak_rss_mib"]
    print(f"\nin-process backend, model {args.model}, 1 round x 1 local step per client")
    print(f"{'clients':>8}{'peak RSS MiB':>15}{'vs first':>10}{'wall s':>9}")
    for n, r in results.items():
        print(
            f"{n:>8}{r['peak_rss_mib']:>15.0f}{r['peak_rss_mib'] / first:>9.2f}x{r['wall_s']:>9.1f}"
        )
    results_path(f"memory_{args.model}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
