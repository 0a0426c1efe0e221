"""Scale: coordinator memory and framework overhead as the clients per round grow.

Every scenario runs in its own process (nothing one leaves behind reaches the next), one after
the other in this one invocation, on this machine:

1. **Coordinator memory with real update sizes** (``benchmarks/scale_round.py``): one round of
   model-free clients replying with SmolLM2-135M's r=8 q/v adapter (460,800 parameters, 1.8 MB
   per update; ``--shape llama-1b`` for Llama-3.2-1B's, 3.4 MB), FedAvg, every message
   serialized. Streaming (``federation.aggregation = "stream"``, 64 in flight) against the
   batch path, at 10^2, 10^3 and 10^4 clients per round; the batch path only where its updates
   fit this machine's memory. Peak RSS of the process and its growth over the round.
2. **Framework overhead of whole simulations** (``fedpeft simulate``, the tiny model, one
   round, every client sampled): an empty trainer (``train.trainer = "noop"``: the client
   echoes its adapter) and one local LoRA step, at 10^2, 10^3 and 10^4 clients per round,
   in-process with and without wire serialization (``simulation.serialize``), and on Ray at
   10^2 and 10^3. The round's wall time per client (the overhead per client with the empty
   trainer) and the peak RSS of the process tree (clients included).
3. **Population** (``fedpeft simulate``, the tiny model, 100 clients a round
   (``federation.clients_per_round``), each client drawing 4 records
   (``federation.records_per_client``, Dirichlet key mixes), one local LoRA step, two
   rounds): populations of 10^4, 10^5 and 10^6 with discovery of the sampled clients only
   (``federation.discovery = "sampled"``) against asking every node first (``"all"``) at
   10^3 and 10^4. The start (discovery and the round-0 evaluation, the first row's wall
   time), a round's wall time, the whole command's wall time (imports and model load
   included) and peak RSS.

    .venv/bin/python benchmarks/scale.py [--parts memory overhead population]
        [--shape smollm2-135m] [--clients 100 1000 10000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _bench import REPO, add_quick, results_path
from _measure import Measured, run_measured

BENCH = Path(__file__).resolve().parent
MEMORY_LIMIT_GB = 16.0  # the batch path is run only where its updates fit below this
WINDOW = 64


def _memory(shape: str, clients: list[int], update_mb: float) -> list[dict[str, Any]]:
    rows = []
    for n in clients:
        for agg in ("batch", "stream"):
            if agg == "batch" and n * update_mb * 2 / 1e3 > MEMORY_LIMIT_GB:
                rows.append({"clients": n, "aggregation": agg, "skipped":
                             f"holds ~{n * update_mb / 1e3:.0f} GB of updates"})  # fmt: skip
                continue
            cmd = [sys.executable, str(BENCH / "scale_round.py"), "--clients", str(n),
                   "--aggregation", agg, "--shape", shape, "--window", str(WINDOW)]  # fmt: skip
            m = run_measured(cmd, timeout=7200)
            if m.returncode != 0:
                sys.exit(f"scale_round {n} {agg} failed:\n{m.tail}")
            row = json.loads(m.tail.strip().splitlines()[-1])
            row["growth_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
            rows.append(row)
            print(f"  memory {n:>6} {agg:<7} peak {row['peak_rss_mib']:7.0f} MiB", flush=True)
    return rows


def _tiny_run(what: str, overrides: list[str]) -> tuple[list[dict[str, Any]], Measured]:
    """``fedpeft simulate`` of the tiny scenario with ``overrides`` in its own process: its
    metrics rows and what the run cost (``what`` names it if it fails)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
            "--config", str(REPO / "simulations" / "tiny.toml"), "--out", out,
            *overrides, "federation.aggregation=stream", "train.local_steps=1",
            "train.batch_size=4", "eval.every=0", "eval.examples=4", "data.metric=none",
            "federation.connect_timeout_s=3600",
        ]  # fmt: skip
        m = run_measured(cmd, timeout=7200)
        if m.returncode != 0:
            sys.exit(f"simulate {what} failed:\n{m.tail}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return rows, m


def _simulate(n: int, trainer: str, backend: str, serialize: bool) -> dict[str, Any]:
    rows, m = _tiny_run(f"{n} {trainer} {backend}", [
        "--backend", backend, f"train.trainer={trainer}", f"federation.num_clients={n}",
        "federation.rounds=1", "federation.partition=iid", "federation.min_clients=1",
        f"simulation.serialize={str(serialize).lower()}", "data.max_examples_per_client=4",
    ])  # fmt: skip
    last = rows[-1]
    return {
        "clients": n, "trainer": trainer, "backend": backend, "serialize": serialize,
        "round_s": last["wall_s"], "ms_per_client": 1e3 * last["wall_s"] / n,
        "start_s": rows[0]["wall_s"], "peak_rss_mib": m.peak_rss_mib, "wall_s": m.wall_s,
        "trained": last["clients"],
    }  # fmt: skip


def _overhead(clients: list[int], ray_clients: list[int]) -> list[dict[str, Any]]:
    rows = []
    cases = [("noop", "inprocess", True), ("noop", "inprocess", False),
             ("lora", "inprocess", False), ("noop", "ray", True)]  # fmt: skip
    for trainer, backend, serialize in cases:
        for n in ray_clients if backend == "ray" else clients:
            row = _simulate(n, trainer, backend, serialize)
            rows.append(row)
            print(f"  overhead {n:>6} {trainer} {backend} serialize={serialize}: "
                  f"{row['ms_per_client']:.2f} ms/client", flush=True)  # fmt: skip
    return rows


def _population(cases: list[tuple[int, str]]) -> list[dict[str, Any]]:
    rows = []
    for n, discovery in cases:
        got, m = _tiny_run(f"population {n} {discovery}", [
            f"federation.num_clients={n}", "federation.clients_per_round=100",
            f"federation.discovery={discovery}", "federation.records_per_client=4",
            "federation.partition=dirichlet", "federation.rounds=2",
        ])  # fmt: skip
        row = {
            "population": n, "discovery": discovery, "start_s": got[0]["wall_s"],
            "round_s": got[-1]["wall_s"], "wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib,
            "trained": got[-1]["clients"],
        }  # fmt: skip
        rows.append(row)
        print(f"  population {n:>8} {discovery:<8} start {row['start_s']:.2f} s", flush=True)
    return rows


def _print_population(rows: list[dict[str, Any]]) -> None:
    print("\nPopulation, tiny model, 100 clients a round, 1 LoRA step, 2 CPU cores")
    print(f"{'population':>11} {'discovery':<10}{'start s':>8}{'round s':>8}{'command s':>10}"
          f"{'peak RSS MiB':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['population']:>11} {r['discovery']:<10}{r['start_s']:>8.2f}"
              f"{r['round_s']:>8.1f}{r['wall_s']:>10.1f}{r['peak_rss_mib']:>13.0f}")  # fmt: skip


def _print(memory: list[dict[str, Any]], overhead: list[dict[str, Any]], shape: str) -> None:
    if memory:
        print(f"\nCoordinator memory, one round, {shape} r=8 q/v updates, FedAvg, 2 CPU cores")
        print(f"{'clients':>8} {'aggregation':<12}{'peak RSS MiB':>13}{'growth MiB':>12}"
              f"{'ms/client':>11}")  # fmt: skip
        for r in memory:
            if "skipped" in r:
                print(f"{r['clients']:>8} {r['aggregation']:<12}  not run: {r['skipped']}")
                continue
            print(f"{r['clients']:>8} {r['aggregation']:<12}{r['peak_rss_mib']:>13.0f}"
                  f"{r['growth_mib']:>12.0f}{r['ms_per_client']:>11.1f}")  # fmt: skip
        stream = {r["clients"]: r for r in memory if r["aggregation"] == "stream"}
        lo, hi = min(stream), max(stream)
        ratio = stream[hi]["peak_rss_mib"] / stream[lo]["peak_rss_mib"]
        print(f"stream peak RSS at {hi} / at {lo} clients: {ratio:.2f}x (goal <= 1.2x)")
    if overhead:
        print("\nSimulation overhead, tiny model, one round, every client sampled, 2 CPU cores")
        print(f"{'clients':>8} {'trainer':<8}{'backend':<10}{'serialize':<10}{'ms/client':>10}"
              f"{'round s':>9}{'peak RSS MiB':>13}")  # fmt: skip
        for r in overhead:
            print(f"{r['clients']:>8} {r['trainer']:<8}{r['backend']:<10}"
                  f"{str(r['serialize']).lower():<10}{r['ms_per_client']:>10.2f}"
                  f"{r['round_s']:>9.1f}{r['peak_rss_mib']:>13.0f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["memory", "overhead", "population"])
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "llama-1b"])
    ap.add_argument("--clients", nargs="+", type=int, default=[100, 1000, 10000])
    ap.add_argument("--ray-clients", nargs="+", type=int, default=[100, 1000])
    add_quick(ap)
    args = ap.parse_args()
    sizes = args.clients
    populations = [(10**4, "sampled"), (10**5, "sampled"), (10**6, "sampled"),
                   (10**3, "all"), (10**4, "all")]  # fmt: skip
    if args.quick:
        args.shape, args.clients, args.ray_clients, sizes = "small", [4, 8], [], [4]
        populations = [(10**6, "sampled")]
    update_mb = {"small": 0.25, "smollm2-135m": 1.84, "llama-1b": 3.41}[args.shape]
    memory = _memory(args.shape, args.clients, update_mb) if "memory" in args.parts else []
    overhead = _overhead(sizes, args.ray_clients) if "overhead" in args.parts else []
    population = _population(populations) if "population" in args.parts else []
    _print(memory, overhead, args.shape)
    if population:
        _print_population(population)
    results_path("scale.json").write_text(
        json.dumps(
            {"args": vars(args), "memory": memory, "overhead": overhead, "population": population},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
