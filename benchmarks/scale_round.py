"""One coordinator round of N synthetic LoRA clients: the coordinator's peak memory and time.

The clients are a Flower ``ClientApp`` without a model: each decodes its instruction and
replies with the factors it was sent plus a seeded random change (``N(0, 1e-3)``), through
the in-process grid with every message serialized, so what grows with N is the
coordinator's own work: encoding, byte counting, decoding, validation and aggregation
(FedAvg, example-weighted). The adapter has the LoRA shapes (rank 8 on q_proj and v_proj)
of a real model, built in code:

- ``smollm2-135m``: 30 layers, q 576 -> 576, v 576 -> 192: 460,800 parameters (1.8 MB);
- ``llama-1b``: Llama-3.2-1B's 16 layers, q 2048 -> 2048, v 2048 -> 512: 851,968 (3.4 MB);
- ``small``: 4 of those 30 layers: 61,440 (245 KB; tests).

Prints one JSON line: peak RSS of this process (``VmHWM``), its RSS before the round,
the round's wall time and time per client. Run one scenario per process (``benchmarks/
scale.py`` does), so no scenario inherits another's memory.

    .venv/bin/python benchmarks/scale_round.py --clients 2000 --aggregation stream \
        --shape llama-1b [--window 256]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.config import CompressConfig, TrainConfig, ValidationConfig
from fedpeft.families import LORA, Stamp
from fedpeft.seeding import derive_seed
from fedpeft.server.exchange import exchange
from fedpeft.server.fold import Fold
from fedpeft.server.validate import Limits, cap_weights, weight_cap
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.wire.messages import (
    ClientInfo,
    Header,
    LoraFactors,
    LoraSpec,
    LoraUpdate,
    decode_instruction,
    encode_update,
)

# layers, hidden, v width: rank-8 LoRA on q (hidden -> hidden) and v (hidden -> v width)
SHAPES = {"small": (4, 576, 192), "smollm2-135m": (30, 576, 192), "llama-1b": (16, 2048, 512)}
RANK = 8
RUN = "scale-0000000000000000"
FINGERPRINT = "synthetic/none"


def adapter(shape: str) -> dict[str, LoraFactors]:
    """The starting global adapter: ``A`` small random, ``B = 0`` (as LoRA starts)."""
    layers, hidden, v = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(layers):
        for name, width in (("q_proj", hidden), ("v_proj", v)):
            a = torch.randn(RANK, hidden, generator=gen) * 0.01  # (r, in)
            out[f"model.layers.{i}.self_attn.{name}"] = LoraFactors(
                a=a, b=torch.zeros(width, RANK), alpha=16.0
            )  # b: (out, r)
    return out


def examples(cid: str) -> int:
    """Client ``cid``'s example count: 10..109, so weights differ."""
    return 10 + derive_seed(0, "examples", cid) % 100


def client_app() -> ClientApp:
    """Replies with the sent factors plus a change seeded by the client id."""
    app = ClientApp()

    @app.train("lora")
    def train(msg: Message, context: Context) -> Message:
        ins = decode_instruction(msg.content)
        cid = ins.header.client_id
        gen = torch.Generator().manual_seed(derive_seed(0, "change", cid))
        factors = {
            m: replace(
                f,
                a=f.a + 1e-3 * torch.randn(f.a.shape, generator=gen),
                b=f.b + 1e-3 * torch.randn(f.b.shape, generator=gen),
            )
            for m, f in ins.adapter.items()
        }
        header = replace(ins.header, num_examples=examples(cid))
        update = LoraUpdate(header=header, factors=factors, metrics={"train_loss": 1.0})
        return Message(encode_update(update), reply_to=msg)

    return app


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would carry the parent's
    peak across ``fork`` and ``exec``)."""
    status = Path("/proc/self/status").read_text(encoding="ascii")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--aggregation", choices=["batch", "stream"], default="stream")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--window", type=int, default=256, help="stream: instructions in flight")
    args = ap.parse_args()

    start = adapter(args.shape)
    spec = LoraSpec(rank=RANK, alpha=16.0, target_modules=("q_proj", "v_proj"))
    strategy = FedAvg(FedAvg.Config(), StrategyContext(initial=start, spec=spec, seed=0))
    cids = [str(i) for i in range(args.clients)]
    infos = [
        ClientInfo(Header(RUN, 0, FINGERPRINT, "", examples(c), c), device="cpu") for c in cids
    ]
    plans = strategy.configure_train(1, infos)
    instructions = {
        c: LORA.instruction(
            plans[c],
            Stamp(
                Header(RUN, 1, FINGERPRINT, spec.config_hash(), 0, c),
                TrainConfig(),
                derive_seed(0, "client-round", 1, c),
                CompressConfig(),
            ),
        )  # fmt: skip
        for c in cids
    }
    grid = InProcessGrid(client_app(), [{} for _ in cids])
    nodes = dict(zip(cids, grid.get_node_ids(), strict=True))
    limits = {c.client_id: Limits(ValidationConfig(), c.num_examples) for c in infos}
    stream = args.aggregation == "stream"
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    fold = Fold(instructions, cap=weight_cap([c.num_examples for c in infos], 10.0))
    got = exchange(
        grid, instructions, nodes, 1, 3600.0, limits, fold if stream else None,
        args.window if stream else 0,
    )  # fmt: skip
    if got.failures:
        raise SystemExit(f"clients failed: {dict(list(got.failures.items())[:3])}")
    updates = fold.result(got.updates) if stream else cap_weights(got.updates, 10.0)[0]
    result = strategy.aggregate_train(1, updates)
    round_s = time.perf_counter() - t0
    assert result.adapter is not None
    b = np.concatenate([f.b.numpy().ravel() for f in result.adapter.values()])
    params = sum(f.a.numel() + f.b.numel() for f in start.values())
    print(
        json.dumps(
            {
                "clients": args.clients,
                "aggregation": args.aggregation,
                "shape": args.shape,
                "params": params,
                "update_mb": params * 4 / 1e6,
                "peak_rss_mib": peak_rss_mib(),
                "rss_before_mib": rss_before / 2**20,
                "round_s": round_s,
                "ms_per_client": 1e3 * round_s / args.clients,
                "bytes_up": got.counts["bytes_up"],
                "global_b_abs_mean": float(np.abs(b).mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
