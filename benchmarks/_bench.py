"""What the benchmark scripts share: where results go, and the ``--quick`` smoke size.

``--quick`` runs a script at its smallest size (the tiny model built in code, one round, a
few clients, a subset of the cases) so that the test suite can check every script end to end
(``tests/test_benchmarks.py``). Its numbers measure nothing; only that the script works and
its values are sane. Results go to ``benchmarks/results/``, or to ``$FEDPEFT_BENCH_RESULTS``
when that is set (the smoke tests set it to a temporary folder so a real result is never
overwritten).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fedpeft.cli import APP_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
# a benchmark is an application, like the fedpeft command: offline, no telemetry
for _key, _value in APP_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)
QUICK_TITLE = "tiny model (--quick)"  # the model a --quick table names
QUICK_HELP = "smallest size (tiny model, one round, few cases): a smoke run; numbers mean nothing"


def add_quick(ap: argparse.ArgumentParser) -> None:
    """Add ``--quick`` to a script's arguments."""
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)


def results_path(name: str) -> Path:
    """Where a script writes its result ``name`` (its folder is created)."""
    folder = Path(os.environ.get("FEDPEFT_BENCH_RESULTS") or REPO / "benchmarks" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


# what --quick adds to a scenario's overrides (after the script's own, so they win)
QUICK_OVERRIDES = [
    "model.name=tiny",
    "federation.rounds=1",
    "data.max_examples_per_client=16",
    "train.max_seq_len=48",
    "eval.examples=8",
    "eval.batch_size=8",
    "eval.max_new_tokens=4",
]


def simulate_cli(
    scenario: str | Path, out: Path, overrides: list[str], env: dict[str, str] | None = None
) -> None:
    """One ``fedpeft simulate --quiet`` in its own process (a clean state); exits on failure.

    ``env``: variables to set in that process (e.g. ``OMP_NUM_THREADS``)."""
    scenario = REPO / "simulations" / scenario
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet",
           "--config", str(scenario), "--out", str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{out.name} failed:\n{proc.stderr[-3000:]}")
