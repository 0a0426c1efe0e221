"""Cost of one zeroth-order (FedKSeed) step against the floor of its two forward passes.

For each model (tiny and SmolLM2-135M), target (all parameters, or LoRA r=8 on q/v) and
mode (directions regenerated 3 times per step, or generated once and kept), on one fixed batch
of 8 x 64 tokens, in one run:

- ``fwd x2``: two forward passes alone (the floor of a two-point step);
- ``step``: one whole step (perturb +eps, forward, perturb -eps, forward, fused restore+update);
- ``ratio`` = step / fwd x2, and the regenerations per step;
- ``regen``: one regeneration of the tuned tensors (direction generation + in-place add);
- ``sync K``: rebuilding from theta_0 with all K=4096 coefficients non-zero (K regenerations).
  For SmolLM2's full parameters it is measured on 32 seeds and scaled by K/32 (marked ``*``).

Medians of repeated timings; CPU threads as torch sets them. Writes
``benchmarks/results/zo_step.json``.

    .venv/bin/python benchmarks/zo_step.py [--models tiny smollm2-135m] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from _bench import add_quick, results_path

from fedpeft.config import ModelConfig
from fedpeft.models import load_model
from fedpeft.wire.messages import LoraSpec
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.local import LocalZo
from fedpeft.zo.runtime import ZoRuntime

warnings.filterwarnings("ignore")
K = 4096  # seeds in the pool; --quick uses 64


def _median(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bench(handle, target: str, keep_z: bool, reps: int, k: int = K) -> dict[str, float]:
    lora = LoraSpec(8, 16.0, ("q_proj", "v_proj")) if target == "lora" else None
    spec = ZoSpec("fedkseed", target, k, pool_seed=1, eps=1e-3, lr=1e-7, keep_z=keep_z, lora=lora)
    rt = ZoRuntime(handle, spec)
    batch = _batch(handle.tokenizer.vocab_size if hasattr(handle.tokenizer, "vocab_size") else 384)
    batch = {k: v.clamp(max=handle.base_model.config.vocab_size - 1) for k, v in batch.items()}
    local = LocalZo(rt, spec)
    with rt.model() as model, torch.no_grad():

        def forward() -> float:
            return float(model(**batch).loss)

        def step() -> None:
            local.begin(rt.seed(7))
            local.perturb(spec.eps)
            lp = forward()
            local.perturb(-spec.eps)
            lm = forward()
            local.update(-spec.lr * (lp - lm) / (2 * spec.eps))

        def forward2() -> None:
            forward()
            forward()

        # interleave the floor and the step so that machine noise hits both alike
        forward2(), step()
        fwd_t, step_t = [], []
        before = local.regenerations
        for _ in range(reps):
            t0 = time.perf_counter()
            forward2()
            fwd_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step()
            step_t.append(time.perf_counter() - t0)
        regens = (local.regenerations - before) / reps
        fwd2, step_s = statistics.median(fwd_t), statistics.median(step_t)
        ratio = statistics.median(s / f for s, f in zip(step_t, fwd_t, strict=True))

        def regen() -> None:
            local.begin(rt.seed(1))
            local.perturb(0.0)

        regen_s = _median(regen, reps) if not keep_z else float("nan")
    rt.restore()
    n_sync = k if (target == "lora" or rt.numel < 10_000_000) else 32
    coeffs = np.zeros((1, k), np.float32)
    coeffs[0, :n_sync] = 1e-6
    t0 = time.perf_counter()
    used = rt.set_global(coeffs, 1)
    sync_s = (time.perf_counter() - t0) * (k / n_sync)
    rt.rewind()
    return {
        "tuned_params": rt.numel,
        "fwd2_s": fwd2,
        "step_s": step_s,
        "ratio": ratio,
        "regens_per_step": regens,
        "regen_s": regen_s,
        "sync_K_s": sync_s,
        "sync_extrapolated": n_sync < k,
        "seeds": k,
        "sync_regens_measured": used,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--reps", type=int, default=5)
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.models, args.reps = ["tiny"], 1
    k = 64 if args.quick else K
    rows = []
    for name in args.models:
        handle = load_model(ModelConfig(name=name))
        for target in ("full", "lora"):
            for keep_z in (False, True):
                r = bench(handle, target, keep_z, args.reps, k)
                rows.append({"model": name, "target": target, "keep_z": keep_z, **r})
    head = f"{'model':<14}{'target':<7}{'z kept':<8}{'params':>12}{'fwd x2 s':>10}{'step s':>9}"
    print("\nFedKSeed step vs two forward passes, batch 8 x 64 tokens, CPU")
    print(head + f"{'ratio':>7}{'regen/step':>11}{'regen s':>9}{f'sync K={k} s':>15}")
    for r in rows:
        sync = f"{r['sync_K_s']:.1f}{'*' if r['sync_extrapolated'] else ''}"
        regen = "-" if r["keep_z"] else f"{r['regen_s']:.3f}"
        kept = "yes" if r["keep_z"] else "no"
        print(
            f"{r['model']:<14}{r['target']:<7}{kept:<8}{r['tuned_params']:>12,}"
            f"{r['fwd2_s']:>10.3f}{r['step_s']:>9.3f}{r['ratio']:>7.2f}{r['regens_per_step']:>11.0f}"
            f"{regen:>9}{sync:>15}"
        )
    print(f"* measured on 32 seeds, scaled to {k}")
    results_path("zo_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
