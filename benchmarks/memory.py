"""Peak memory: of the in-process backend as virtual clients grow, and of one client's training
step by base precision and method (what decides whether an edge device can take part).

``--part clients``: one round of real LoRA training (1 local step, batch 2) with 1, 10 and 100
virtual clients on the same base model, each in a fresh process; peak RSS side by side. Every
client adds only its tokenized data: the base model is loaded once per process.

``--part precision``: one client, one round of ``--steps`` local steps at batch 8 x 64 tokens,
for each base precision (float32, bfloat16, nf4, int8) x method (LoRA r=8 with AdamW, the
same with gradient checkpointing, seed/scalar (FedKSeed) over the LoRA factors, seed/scalar
over every base weight), each in a fresh process: the client's measured peak training memory
(``peak_mem_mb`` from metrics.jsonl: on CPU weights + saved activations + gradients +
optimizer state, each measured on the tensors; on CUDA the allocator's peak), the process's
peak RSS, the time per local step and the eval loss before and after. Beside them, "inference"
rows: the same base at that precision answering one no-grad forward of the same batch (what
inference alone holds, by the same meter). Ratios are against float32 LoRA and inference.

    .venv/bin/python benchmarks/memory.py [--part clients|precision|all] [--model smollm2-135m]
        [--clients 1 10 100] [--steps 10] [--precisions float32 bfloat16 nf4 int8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from _bench import REPO, add_quick, results_path
from _measure import run_measured

from fedpeft.report.runs import load_run

PRECISIONS = ("float32", "bfloat16", "nf4", "int8")
# method -> scenario overrides (the rest from simulations/default.toml)
METHODS: dict[str, list[str]] = {
    "lora": [],
    "lora+ckpt": ["train.gradient_checkpointing=true"],
    "zo-lora": ["strategy.name=fedkseed", "zo.target=lora", "zo.num_seeds=1024"],
    "zo-full": ["strategy.name=fedkseed", "zo.target=full", "zo.num_seeds=1024"],
}


def _precision(p: str) -> list[str]:
    if p in ("float32", "bfloat16"):
        return [f"model.dtype={p}"]
    return ["model.dtype=float32", f"model.quantization={p}"]


def _clients(args: argparse.Namespace) -> dict[int, Any]:
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
    return results


def _train_case(args: argparse.Namespace, precision: str, method: str) -> dict[str, Any]:
    steps = [f"train.local_steps={args.steps}"]
    steps += [f"zo.local_steps={args.steps}"] if method.startswith("zo-") else []
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
            "--config", str(REPO / "simulations" / "default.toml"), "--out", out,
            f"model.name={args.model}", "federation.num_clients=1", "federation.min_clients=1",
            "federation.rounds=1", "federation.partition=iid", "data.metric=none",
            f"eval.examples={args.eval_examples}", "lora.rank=8",
            *_precision(precision), *METHODS[method], *steps, *args.extra,
        ]  # fmt: skip
        m = run_measured(cmd)
        if m.returncode != 0:
            if "configuration error" in m.tail:
                return {"refused": m.tail.strip().splitlines()[-1][:300]}
            sys.exit(f"{precision} {method} failed:\n{m.tail}")
        rows = load_run(out).rows
    return {
        "peak_mem_mib": rows[1]["peak_mem_mb_max"],
        "peak_rss_mib": m.peak_rss_mib,
        "step_s": rows[1]["train_s_max"] / args.steps,
        "loss_before": rows[0]["eval_loss"],
        "loss_after": rows[1]["eval_loss"],
    }


def probe(model: str, precision: str, batch: int, seq: int) -> None:
    """(In its own process) one no-grad forward of a ``batch`` x ``seq`` batch; prints JSON:
    the meter's weights and the process's RSS."""
    import psutil
    import torch

    from fedpeft.client.memory import MIB, MemoryMeter
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model

    q = precision if precision in ("nf4", "int8") else "none"
    dtype = precision if q == "none" else "float32"
    handle = load_model(ModelConfig(name=model, dtype=dtype, quantization=q))
    meter = MemoryMeter(handle.base_model, "", handle.device)
    vocab = min(1000, len(handle.tokenizer))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        handle.base_model(input_ids=ids.to(handle.device))
    report = meter.report()
    rss = psutil.Process().memory_info().rss / MIB
    print(json.dumps({"peak_mem_mib": report["peak_mem_mb"], "rss_mib": rss}))


def _inference(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", precision, "--model", args.model]
    m = run_measured(cmd)
    if m.returncode != 0:
        sys.exit(f"inference {precision} failed:\n{m.tail}")
    got = json.loads(m.tail.strip().splitlines()[-1])
    return {"peak_mem_mib": got["peak_mem_mib"], "peak_rss_mib": m.peak_rss_mib}


def _precision_table(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for p in args.precisions:
        results[p] = {"inference": _inference(args, p)}
        for method in args.methods:
            results[p][method] = _train_case(args, p, method)
            print(f"  {p:>9} {method:<10} {results[p][method]}", file=sys.stderr)
    ref = results[args.precisions[0]].get("lora", {}).get("peak_mem_mib")
    print(f"\none client, model {args.model}, {args.steps} local steps at batch 8 x 64 tokens")
    print(f"{'base':>9} {'method':<10}{'peak MiB':>10}{'vs f32 LoRA':>12}{'vs infer':>9}"
          f"{'RSS MiB':>9}{'step s':>8}{'loss before':>12}{'after':>7}")  # fmt: skip
    for p, cases in results.items():
        inf = cases["inference"]["peak_mem_mib"]
        for method, r in cases.items():
            if "refused" in r:
                why = r["refused"].split("configuration error: ")[-1]
                print(f"{p:>9} {method:<10}    refused at load: {why[:58]}...")
                continue
            vs_ref = f"{r['peak_mem_mib'] / ref:.2f}x" if ref else "-"
            line = (f"{p:>9} {method:<10}{r['peak_mem_mib']:>10.1f}{vs_ref:>12}"
                    f"{r['peak_mem_mib'] / inf:>8.2f}x{r['peak_rss_mib']:>9.0f}")  # fmt: skip
            if method != "inference":
                line += f"{r['step_s']:>8.2f}{r['loss_before']:>12.3f}{r['loss_after']:>7.3f}"
            print(line)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["clients", "precision", "all"], default="all")
    ap.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF id/path")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--steps", type=int, default=10, help="precision: local steps per case")
    ap.add_argument("--eval-examples", type=int, default=64, help="precision: eval records")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--extra", nargs="*", default=[], help="precision: more overrides")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: inference
    add_quick(ap)
    args = ap.parse_args()
    if args.probe:
        probe(args.model, args.probe, 8, 64)
        return
    if args.quick:
        args.model, args.clients, args.steps, args.eval_examples = "tiny", [1, 3], 2, 8
        args.precisions = ["float32", "nf4"]
        args.extra = [*args.extra, "data.max_examples_per_client=32"]
    if args.part in ("clients", "all"):
        results = _clients(args)
        results_path(f"memory_{args.model}.json").write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2)
        )
    if args.part in ("precision", "all"):
        table = _precision_table(args)
        results_path(f"memory_precision_{args.model}.json").write_text(
            json.dumps({"args": vars(args), "results": table}, indent=2)
        )


if __name__ == "__main__":
    main()
