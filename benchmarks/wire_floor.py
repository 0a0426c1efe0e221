"""The floor of a client's framework overhead: its two Flower messages and nothing else.

What any in-process round costs per client before fedpeft does anything of its own: the
instruction built from the round's shared records, the client reading its 8 arrays and
building a reply of 8 arrays (the tiny model's adapter shapes) with a header and a metric,
and the coordinator reading them back; then the same with every message's bytes counted
exactly (Flower's deflated objects, each once, through fedpeft's ``WireCache``). Arrays go
through fedpeft's fast ``.npy`` paths. Beside them, in the same invocation, a whole
``fedpeft simulate`` round of 1,000 clients with the empty trainer and
``simulation.serialize = false`` (its own process), whose round time per client includes
all of that plus decoding, validation, weighting and folding.

    .venv/bin/python benchmarks/wire_floor.py [--clients 2000] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _bench import REPO, add_quick, results_path


def floor(clients: int, count: bool) -> float:
    """Milliseconds per client of the bare message work (``count``: with exact bytes)."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedpeft._flwr import WireCache, set_task_identity
    from fedpeft.wire.npy import array_of, ndarray_of

    set_task_identity(1, 1)
    rng = np.random.default_rng(0)
    shapes = [(8, 64), (64, 8)] * 4
    shared = ArrayRecord(
        {f"m{i // 2}::{'AB'[i % 2]}": array_of(rng.standard_normal(s, np.float32))
         for i, s in enumerate(shapes)}
    )  # fmt: skip
    train = ConfigRecord({"lr": 0.1, "steps": 1, "strategy": "fedavg", "round": 1})
    wire = WireCache()
    t0 = time.perf_counter()
    for i in range(clients):
        header = ConfigRecord({"client": str(i)})
        ins = Message(RecordDict({"adapter": shared, "train": train, "header": header}),
                      10_001 + i, "train", group_id="1")  # fmt: skip
        if count:
            wire.nbytes(ins)
        got = {k: torch.from_numpy(ndarray_of(a).copy()) for k, a in ins.content["adapter"].items()}
        content = RecordDict({
            "adapter": ArrayRecord({k: array_of(t.numpy()) for k, t in got.items()}),
            "header": ConfigRecord({"client": str(i), "num_examples": 4}),
            "metrics": MetricRecord({"train_loss": 1.0}),
        })  # fmt: skip
        reply = Message(content, reply_to=ins)
        if count:
            wire.nbytes(reply)
        {k: ndarray_of(a) for k, a in reply.content["adapter"].items()}
    return 1e3 * (time.perf_counter() - t0) / clients


def _floor_in_own_process(clients: int, count: bool) -> float:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import wire_floor; "
        "print(wire_floor.floor(int(sys.argv[2]), sys.argv[3] == '1'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "benchmarks"), str(clients), str(int(count))],
        capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    add_quick(ap)
    args = ap.parse_args()
    sim_clients = 1000
    if args.quick:
        args.clients, args.reps, sim_clients = 50, 1, 8
    from scale import _simulate

    rows = {"floor, no byte count": [], "floor, exact byte count": [], "fedpeft round": []}
    for _ in range(args.reps):  # interleaved, so a change in the machine's load hits all three
        rows["floor, no byte count"].append(_floor_in_own_process(args.clients, False))
        rows["floor, exact byte count"].append(_floor_in_own_process(args.clients, True))
        rows["fedpeft round"].append(
            _simulate(sim_clients, "noop", "inprocess", False)["ms_per_client"]
        )
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nFramework overhead per client and round, median of {args.reps}, 2 CPU cores")
    print(f"{'':32}{'ms/client':>10}{'/ round':>9}   runs")
    for k, v in rows.items():
        ratio = medians[k] / medians["fedpeft round"]
        runs = " ".join(f"{x:.2f}" for x in v)
        print(f"{k:32}{medians[k]:>10.2f}{ratio:>9.2f}   {runs}")
    print(f"(floor: {args.clients} clients' messages in one process; fedpeft round: "
          f"fedpeft simulate, {sim_clients} clients, noop trainer, serialize = false)")  # fmt: skip
    results_path("wire_floor.json").write_text(json.dumps({"args": vars(args), "runs": rows}))


if __name__ == "__main__":
    main()
