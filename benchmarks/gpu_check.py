"""The GPU check: what only a CUDA machine can show, in one script (about 5 minutes on one GPU).

1. **CUDA tests**: ``pytest -m cuda`` (the tests that skip where no GPU is).
2. **Directions CPU == CUDA**: the seed/scalar directions of every parameter of the model
   (SmolLM2-135M: 134.5 M elements), Rademacher and Gaussian, generated on the CPU and on the
   GPU, compared by a SHA-256 of their bits.
3. **Rounds on CUDA**: one client, one round of ``--steps`` local steps at batch 8 x 64 tokens,
   LoRA (AdamW) and seed/scalar over LoRA, on a bfloat16 base (``model.dtype = auto``, which
   must resolve to bfloat16 on a GPU that supports it) and on an nf4 base: the allocator's
   peak memory (``torch.cuda.max_memory_allocated``, from metrics.jsonl), time per step, eval
   loss before and after. Each in its own process.
4. **Fractional-GPU Ray clients**: 4 virtual clients sharing the GPU
   (``simulation.ray_num_gpus = 0.25``), one round.

Prints a table and writes ``gpu_check.json``. ``--dry-run`` runs on a machine without a GPU:
the CUDA parts are reported as skipped, the CPU halves still run (directions on the CPU in two
processes, the rounds on the CPU), on the tiny model.

    .venv/bin/python benchmarks/gpu_check.py [--model smollm2-135m] [--steps 10] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import REPO, add_quick, results_path
from _measure import run_measured

from fedpeft.report.runs import load_run

SKIPPED = "skipped (no CUDA device)"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def cuda_tests() -> dict[str, Any]:
    """``pytest -m cuda``: its summary line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "cuda", "tests"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    lines = [x for x in done.stdout.strip().splitlines() if x.strip()]
    return {"ok": done.returncode == 0, "summary": lines[-1] if lines else done.stderr[-300:]}


def direction_digest(model: str, device: str) -> dict[str, str]:
    """SHA-256 of the directions of every parameter of ``model``, per distribution."""
    import torch

    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model
    from fedpeft.zo.rng import DISTRIBUTIONS, directions

    handle = load_model(ModelConfig(name=model, device="cpu"))
    params = [(n, p.numel()) for n, p in handle.base_model.named_parameters()]
    out = {}
    for dist in DISTRIBUTIONS:
        h = hashlib.sha256()
        for name, numel in params:
            for _, z in directions(11, name, numel, dist, torch.device(device), torch.float32):
                h.update(z.cpu().numpy().tobytes())
        out[dist] = h.hexdigest()
    out["elements"] = str(sum(n for _, n in params))
    return out


def _digest_in_process(model: str, device: str) -> dict[str, Any]:
    code = (
        f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from gpu_check import direction_digest; "
        f"print(json.dumps(direction_digest({model!r}, {device!r})))"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "s": time.perf_counter() - t0}


def directions_check(model: str, dry: bool) -> dict[str, Any]:
    """Digests on the CPU and on CUDA (dry run: on the CPU in a second process)."""
    cpu = _digest_in_process(model, "cpu")
    other = _digest_in_process(model, "cpu" if dry else "cuda")
    same = all(cpu.get(d) == other.get(d) for d in ("rademacher", "gaussian"))
    return {"cpu": cpu, "other": other, "other_device": "cpu" if dry else "cuda", "same": same}


def round_case(model: str, device: str, base: str, method: str, steps: int) -> dict[str, Any]:
    """One client, one round; its peak memory, step time and losses."""
    quant = [] if base in ("auto", "float32") else [f"model.quantization={base}"]
    dtype = "auto" if base != "float32" else "float32"
    zo = ["strategy.name=fedkseed", "zo.target=lora", f"zo.local_steps={steps}"]
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
            "--config", str(REPO / "simulations" / "default.toml"), "--out", out,
            f"model.name={model}", f"model.device={device}", f"model.dtype={dtype}", *quant,
            "federation.num_clients=1", "federation.min_clients=1", "federation.rounds=1",
            "federation.partition=iid", "data.metric=none", "eval.examples=64",
            f"train.local_steps={steps}", *(zo if method == "zo-lora" else []),
        ]  # fmt: skip
        m = run_measured(cmd)
        if m.returncode != 0:
            return {"error": m.tail[-800:]}
        rows = load_run(out).rows
    return {
        "peak_mem_mib": rows[1]["peak_mem_mb_max"],
        "step_s": rows[1]["train_s_max"] / steps,
        "loss_before": rows[0]["eval_loss"],
        "loss_after": rows[1]["eval_loss"],
        "wall_s": m.wall_s,
    }


def auto_dtype() -> str:
    """What ``model.dtype = auto`` resolves to on this machine's first CUDA device."""
    import torch

    from fedpeft.models import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cuda")))


def ray_fractional(model: str) -> dict[str, Any]:
    """4 virtual clients on Ray with a quarter of the GPU each, one round."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet", "--backend", "ray",
            "--config", str(REPO / "simulations" / "tiny.toml"), "--out", out,
            f"model.name={model}", "model.device=cuda", "federation.num_clients=4",
            "federation.rounds=1", "simulation.ray_num_gpus=0.25", "simulation.ray_num_cpus=1",
            "train.local_steps=2", "eval.examples=8",
        ]  # fmt: skip
        m = run_measured(cmd)
        if m.returncode != 0:
            return {"error": m.tail[-800:]}
        rows = load_run(out).rows
    return {"clients": rows[1]["clients"], "wall_s": m.wall_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF id/path")
    ap.add_argument("--steps", type=int, default=10, help="local steps of each round")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: CPU halves, tiny model")
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps = "tiny", 2
    cuda = _cuda()
    if not cuda and not args.dry_run:
        sys.exit("no CUDA device here: run with --dry-run, or on a machine with a GPU")
    dry = args.dry_run
    model = "tiny" if dry else args.model
    steps = 2 if dry else args.steps
    device = "cuda" if not dry else "cpu"
    res: dict[str, Any] = {"dry_run": dry, "model": model, "cuda": cuda}
    res["cuda_tests"] = cuda_tests() if not dry else SKIPPED
    res["directions"] = directions_check(model, dry)
    res["auto_dtype"] = auto_dtype() if not dry else SKIPPED
    bases = ["auto", "nf4"] if not dry else ["float32", "nf4"]
    res["rounds"] = {
        f"{base} {method}": round_case(model, device, base, method, steps)
        for base in bases
        for method in ("lora", "zo-lora")
    }
    res["ray_fractional_gpu"] = ray_fractional(model) if not dry else SKIPPED
    _print(res)
    results_path("gpu_check.json").write_text(json.dumps(res, indent=2))


def _print(res: dict[str, Any]) -> None:
    dev = "CPU, dry run" if res["dry_run"] else "CUDA"
    print(f"\nGPU check ({dev}), model {res['model']}")
    ct = res["cuda_tests"]
    print(f"  CUDA tests: {ct if isinstance(ct, str) else ct['summary']}")
    d = res["directions"]
    print(f"  directions over {d['cpu'].get('elements')} elements, CPU vs {d['other_device']}: "
          f"{'identical' if d['same'] else 'DIFFERENT'} (rademacher, gaussian)")  # fmt: skip
    print(f"  model.dtype = auto resolves to: {res['auto_dtype']}")
    print(f"  {'base / method':<16}{'peak MiB':>10}{'step s':>8}{'loss before':>12}{'after':>7}")
    for name, r in res["rounds"].items():
        if "error" in r:
            print(f"  {name:<16} failed: {r['error'][-200:]}")
            continue
        print(f"  {name:<16}{r['peak_mem_mib']:>10.1f}{r['step_s']:>8.2f}"
              f"{r['loss_before']:>12.3f}{r['loss_after']:>7.3f}")  # fmt: skip
    print(f"  Ray, 4 clients x 0.25 GPU: {res['ray_fractional_gpu']}")


if __name__ == "__main__":
    main()
