"""Simulation overhead: 100 clients x 3 rounds with an empty trainer, in-process vs Ray.

Runs ``fedpeft simulate`` on the tiny model with ``train.trainer=noop`` (clients echo the
global adapter back) under both backends, one after the other in this one invocation, and
prints wall time, mean round time and peak memory of the whole process tree side by side.

    .venv/bin/python benchmarks/overhead.py [--clients 100] [--rounds 3] [--backends inprocess ray]
        [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _bench import REPO, add_quick, results_path
from _measure import run_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["inprocess", "ray"])
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        # Ray alone takes over a minute to start on 2 cores; its runs are tested elsewhere
        args.clients, args.rounds, args.backends = 4, 1, ["inprocess"]
    results = {}
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
                "--config", str(REPO / "simulations" / "tiny.toml"), "--out", out,
                "--backend", backend, "train.trainer=noop",
                f"federation.num_clients={args.clients}", f"rounds={args.rounds}",
                "federation.partition=iid", "federation.min_clients=1",
                "data.max_examples_per_client=4",
                "eval.every=0", "eval.examples=4", "data.metric=none",
            ]  # fmt: skip
            m = run_measured(cmd)
            if m.returncode != 0:
                sys.exit(f"{backend} run failed:\n{m.tail}")
            rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            rounds = [r["wall_s"] for r in rows if r["round"] > 0]
            results[backend] = {
                "wall_s": m.wall_s,
                "round_s": sum(rounds) / len(rounds),
                "peak_rss_mib": m.peak_rss_mib,
                "bytes_up_per_round": rows[-1]["bytes_up"],
            }
    print(
        f"\n{args.clients} clients x {args.rounds} rounds, empty trainer, tiny model, 2 CPU cores"
    )
    print(f"{'backend':<12}{'wall s':>10}{'s / round':>12}{'peak RSS MiB':>15}")
    for name, r in results.items():
        print(f"{name:<12}{r['wall_s']:>10.1f}{r['round_s']:>12.3f}{r['peak_rss_mib']:>15.0f}")
    if "inprocess" in results and "ray" in results:
        ip, ray = results["inprocess"], results["ray"]
        print(
            f"{'ray/inproc':<12}{ray['wall_s'] / ip['wall_s']:>9.1f}x"
            f"{ray['round_s'] / ip['round_s']:>11.1f}x"
            f"{ray['peak_rss_mib'] / ip['peak_rss_mib']:>14.1f}x"
        )
    results_path("overhead.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
