"""Cost of secure aggregation per client: time and bytes for N = 10, 50, 100.

Two vector sizes: FFA-LoRA's ``B`` for SmolLM2-135M at rank 8 on q/v (184,320 values) and a
zeroth-order dense K-vector (K = 4096). Each session runs the four stages in one process (the
clients one after another; each client's time is the time its own handler took, so it is what
one device would spend); 10 % of the clients drop after sharing secrets (so the coordinator
also reconstructs their keys). Bytes are the stage requests and replies as Flower
``RecordDict`` protobufs (``fedpeft.secagg`` config record), per client, against the
plaintext float32 upload. Graphs: the default degree (complete up to 17 clients, else
``2 ceil(log2 n) + 2``) and, for comparison, the complete graph.

Prints a table and writes ``benchmarks/results/secagg.json``. About 5 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/secagg.py [--sizes 10 50 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from _bench import add_quick, results_path

from fedpeft._flwr import records_to_bytes
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.flower import to_record
from fedpeft.secagg.params import default_degree
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.session import run_session

VECTORS = {"lora-B 184k": 184_320, "zo K=4096": 4096}


def one(n: int, dim: int, k: int) -> dict[str, Any]:
    """One session; returns per-client time and bytes and the coordinator's time."""
    rng = np.random.default_rng(0)
    vectors = rng.uniform(-0.01, 0.01, (n, dim))
    clients = {i: SecAggClient(vectors[i]) for i in range(n)}
    drop = set(range(0, n, 10))  # 10 % drop after sharing secrets
    spent: dict[int, float] = defaultdict(float)
    down: dict[int, int] = defaultdict(int)
    up: dict[int, int] = defaultdict(int)

    def send(stage: str, requests: Mapping[int, dict[str, Any]]) -> dict[int, Any]:
        out = {}
        for i, req in requests.items():
            down[i] += len(records_to_bytes(to_record(req)))
            if stage in ("mask", "unmask") and i in drop:
                continue
            t0 = time.perf_counter()
            out[i] = clients[i].handle(req)
            spent[i] += time.perf_counter() - t0
            up[i] += len(records_to_bytes(to_record(out[i])))
        return out

    t0 = time.perf_counter()
    server = SecAggServer(n, dim, 0.01, neighbours=k)
    result = run_session(server, send)
    total = time.perf_counter() - t0
    want = vectors[result.survivors].sum(axis=0)
    alive = [i for i in range(n) if i not in drop]
    return {
        "n": n,
        "dim": dim,
        "k": server.k,
        "t": server.t,
        "client_s_mean": float(np.mean([spent[i] for i in alive])),
        "client_s_max": float(max(spent[i] for i in alive)),
        "server_s": total - sum(spent.values()),
        "up_bytes": float(np.mean([up[i] for i in alive])),
        "down_bytes": float(np.mean([down[i] for i in alive])),
        "plain_bytes": 4 * dim,
        "max_abs_error": float(np.abs(result.total - want).max()),
    }


def main() -> None:
    """Run every size and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.sizes = [4]
    rows = []
    for name, dim in VECTORS.items():
        for n in args.sizes:
            for k in sorted({default_degree(n), n - 1}):
                row = one(n, dim, k)
                row["vector"] = name
                row["graph"] = "complete" if row["k"] == n - 1 else "SecAgg+"
                rows.append(row)
                print(json.dumps({x: row[x] for x in ("vector", "n", "k", "client_s_max")}))
    head = (
        f"{'vector':12} {'N':>4} {'graph':>9} {'k':>3} {'t':>3} {'client s':>9} "
        f"{'max':>7} {'server s':>9} {'up KB':>9} {'down KB':>9} {'up/plain':>9} {'max err':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['vector']:12} {r['n']:>4} {r['graph']:>9} {r['k']:>3} {r['t']:>3} "
            f"{r['client_s_mean']:>9.3f} {r['client_s_max']:>7.3f} {r['server_s']:>9.2f} "
            f"{r['up_bytes'] / 1e3:>9.1f} {r['down_bytes'] / 1e3:>9.1f} "
            f"{r['up_bytes'] / r['plain_bytes']:>9.2f} {r['max_abs_error']:>9.1e}"
        )
    print("\n".join(lines))
    path = results_path("secagg.json")
    path.write_text(json.dumps({"rows": rows, "table": lines}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
