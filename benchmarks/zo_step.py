"""Cost of one zeroth-order (FedKSeed) step against the floor of its two forward passes, with
the reference direction generator and the fused kernel side by side, quiet and busy.

Each condition runs in its own process (the OpenMP wait policy is read once, when torch
loads): OpenMP's own wait policy (``default``, ``OMP_WAIT_POLICY`` unset) or
``OMP_WAIT_POLICY=PASSIVE``, each on a quiet machine and with a competing process (a Python
busy loop) on one core. Inside a condition, for each model (tiny and SmolLM2-135M), target
(all parameters, or LoRA r=8 on q/v) and batch (8 x 64 and 1 x 256 tokens), every direction
mode is measured on the same loaded model, interleaved:

- ``reference``: :mod:`fedpeft.zo.rng` builds each direction, then it is added;
- ``fused``: :mod:`fedpeft.zo.fused`, one compiled pass per tensor (same bits);
- ``kept``: z generated once per step into a buffer (``zo.keep_z``, reference generator).

Columns: ``fwd x2`` two forward passes alone (the floor of a two-point step); ``step`` one
whole step (perturb +eps, forward, perturb -eps, forward, fused restore+update); ``ratio`` =
step / fwd x2 (median of per-repetition ratios); ``regen`` one regeneration of the tuned
tensors (direction + in-place add); ``sync K`` rebuilding from theta_0 with all K = 4096
coefficients non-zero (K regenerations; the fused sync adds :data:`fedpeft.zo.fused.GROUP`
Rademacher seeds per pass over a tensor; the reference over SmolLM2's full parameters is
measured on 32 seeds and scaled by K / 32, marked ``*``). Medians of repeated wall-clock
timings, both cores.
Writes ``benchmarks/results/zo_step.json``.

    .venv/bin/python benchmarks/zo_step.py [--models tiny smollm2-135m] [--reps 5]
        [--policies default passive] [--loads quiet busy] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from _bench import add_quick, results_path

warnings.filterwarnings("ignore")
K = 4096  # seeds in the pool; --quick uses 64
BATCHES = ((8, 64), (1, 256))
MODES = ("reference", "fused", "kept")


def _median(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (and the kernel's compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench(handle: Any, target: str, shape: tuple[int, int], reps: int, k: int) -> list[dict]:
    import numpy as np
    import torch

    from fedpeft.wire.messages import LoraSpec
    from fedpeft.wire.zo import ZoSpec
    from fedpeft.zo import fused
    from fedpeft.zo.local import LocalZo
    from fedpeft.zo.runtime import ZoRuntime

    lora = LoraSpec(8, 16.0, ("q_proj", "v_proj")) if target == "lora" else None
    vocab = handle.base_model.config.vocab_size
    ids = torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    runs: dict[str, dict[str, list[float]]] = {m: {"fwd": [], "step": []} for m in MODES}
    locals_, out = {}, []
    for mode in MODES:
        spec = ZoSpec("fedkseed", target, k, pool_seed=1, eps=1e-3, lr=1e-7,
                      keep_z=mode == "kept", lora=lora)  # fmt: skip
        rt = ZoRuntime(handle, spec)
        locals_[mode] = (rt, spec, LocalZo(rt, spec))
    with torch.no_grad():

        def forward(rt: Any) -> float:
            with rt.model() as model:
                return float(model(**batch).loss)

        def step(mode: str) -> None:
            rt, spec, local = locals_[mode]
            with fused.switched(mode == "fused"):
                local.begin(rt.seed(7))
                local.perturb(spec.eps)
                lp = forward(rt)
                local.perturb(-spec.eps)
                lm = forward(rt)
                local.update(-spec.lr * (lp - lm) / (2 * spec.eps))

        for mode in MODES:  # warm-up (compiles the kernel once)
            step(mode)
        for _ in range(reps):  # interleaved: machine noise hits every mode alike
            for mode in MODES:
                rt = locals_[mode][0]
                t0 = time.perf_counter()
                forward(rt), forward(rt)
                runs[mode]["fwd"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                step(mode)
                runs[mode]["step"].append(time.perf_counter() - t0)
    for mode in MODES:
        rt, spec, local = locals_[mode]
        fwd, st = runs[mode]["fwd"], runs[mode]["step"]

        def regen(rt: Any = rt, local: Any = local, mode: str = mode) -> None:
            with fused.switched(mode == "fused"):
                local.begin(rt.seed(1))
                local.perturb(0.0)

        with torch.no_grad():
            regen_s = _median(regen, reps) if mode != "kept" else float("nan")
        rt.restore()
        sync_s, n_sync, used = float("nan"), 0, 0.0
        if mode != "kept" and shape == BATCHES[0]:  # the sync does not depend on the batch
            # the reference over SmolLM2's full parameters takes ~15 min at K = 4096: measured
            # on 32 seeds and scaled; the fused sync is measured whole
            whole = mode == "fused" or target == "lora" or rt.numel < 10_000_000
            n_sync = k if whole else 32
            with fused.switched(mode == "fused"):
                for n in (fused.GROUP, n_sync):  # warm-up (the grouped kernel's compile), run
                    coeffs = np.zeros((1, k), np.float32)
                    coeffs[0, :n] = 1e-6
                    t0 = time.perf_counter()
                    used = rt.set_global(coeffs, 1)
                    sync_s = (time.perf_counter() - t0) * (k / n)
                    rt.rewind()
        out.append({
            "target": target, "batch": f"{shape[0]}x{shape[1]}", "mode": mode,
            "tuned_params": rt.numel, "fwd2_s": statistics.median(fwd),
            "step_s": statistics.median(st),
            "ratio": statistics.median(s / f for s, f in zip(st, fwd, strict=True)),
            "regens_per_step": 1 if mode == "kept" else 3, "regen_s": regen_s,
            "sync_K_s": sync_s, "sync_extrapolated": 0 < n_sync < k, "seeds": k,
            "sync_regens_measured": used, "fused_on": fused.available(),
        })  # fmt: skip
    return out


def child(args: argparse.Namespace) -> None:
    """One condition: every model, target, batch and mode; rows as JSON on stdout."""
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model

    rows = []
    for name in args.models:
        extra = {"tiny_hidden_size": 256} if name == "tiny" else {}  # wide enough to fuse
        handle = load_model(ModelConfig(name=name, **extra))
        for target in ("full", "lora"):
            for shape in BATCHES[:1] if args.quick else BATCHES:
                for r in _bench(handle, target, shape, args.reps, args.k):
                    rows.append({"model": name, **r})
    print("ROWS " + json.dumps(rows))


def _condition(args: argparse.Namespace, policy: str, load: str) -> list[dict]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--child", "--reps", str(args.reps), "--k", str(args.k),
           "--models", *args.models, *(["--quick"] if args.quick else [])]  # fmt: skip
    burner = None
    if load == "busy":  # one core taken by another process, as on a shared host or a phone
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    if done.returncode != 0:
        sys.exit(f"zo_step {policy}/{load} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("ROWS "))
    return [{"policy": policy, "load": load, **r} for r in json.loads(line[5:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--policies", nargs="+", default=["default", "passive"])
    ap.add_argument("--loads", nargs="+", default=["quiet", "busy"])
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.models, args.reps, args.k = ["tiny"], 1, 64
        args.policies, args.loads = args.policies[:1], args.loads[:1]
    if args.child:
        child(args)
        return
    rows = [r for p in args.policies for load in args.loads for r in _condition(args, p, load)]
    print(f"\nFedKSeed step vs two forward passes, CPU ({os.cpu_count()} cores), "
          f"K = {args.k}; ratio = step / fwd x2")  # fmt: skip
    print(f"{'policy':<9}{'load':<7}{'model':<14}{'target':<7}{'batch':<7}{'mode':<10}"
          f"{'params':>12}{'fwd x2 s':>10}{'step s':>9}{'ratio':>7}{'regen s':>9}"
          f"{'sync K s':>10}")  # fmt: skip
    for r in rows:
        sync = "" if r["sync_K_s"] != r["sync_K_s"] else f"{r['sync_K_s']:.1f}"
        sync += "*" if r["sync_extrapolated"] else ""
        regen = "-" if r["mode"] == "kept" else f"{r['regen_s']:.4f}"
        print(f"{r['policy']:<9}{r['load']:<7}{r['model']:<14}{r['target']:<7}{r['batch']:<7}"
              f"{r['mode']:<10}{r['tuned_params']:>12,}{r['fwd2_s']:>10.3f}{r['step_s']:>9.3f}"
              f"{r['ratio']:>7.2f}{regen:>9}{sync:>10}")  # fmt: skip
    print(f"* measured on 32 seeds, scaled to {args.k}")
    results_path("zo_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
