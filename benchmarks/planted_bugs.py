"""The eleven planted one-line bugs of issue 16, each against the test named to catch it.

Each bug is applied to a fresh copy of the package in a temporary folder (the working tree is
never touched); the named tests run there against the bug and must fail, and against the
clean copy and must pass. Prints a table; exits 1 if a bug survives or a clean run fails.

    .venv/bin/python benchmarks/planted_bugs.py            # all eleven (~2 min on 2 cores)
    .venv/bin/python benchmarks/planted_bugs.py --only 4   # one of them
    .venv/bin/python benchmarks/planted_bugs.py --quick    # the smoke run: bug 4 (Shamir)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    """One planted bug: replace ``old`` (which must occur exactly once) by ``new`` in ``path``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = [
    Bug(
        "FLoRA forgets the earlier rounds' stack",
        "fedpeft/algorithms/flora.py",
        "previous=self._stack)",
        "previous=None)",
        (
            "tests/test_hetero_exactness.py::test_flora_global_after_two_rounds_is_the_sum_of_both_rounds",
        ),
    ),
    Bug(
        "validation checks NaN/Inf only in A",
        "fedpeft/server/validate.py",
        "            if not math.isfinite(sq) and not bool(torch.isfinite(t).all()):",
        '            if part == "A" and not math.isfinite(sq)'
        " and not bool(torch.isfinite(t).all()):",
        ("tests/test_validate.py::test_nonfinite_values_are_rejected_in_either_factor",),
    ),
    Bug(
        "seed/scalar replay check (synced_version) removed",
        "fedpeft/server/validate.py",
        "    if update.synced_version != ins.sync.to_version:",
        "    if False:",
        ("tests/test_validate.py::test_seed_scalar_update_synced_to_another_version_is_a_replay",),
    ),
    Bug(
        "Shamir polynomial degree one too low",
        "fedpeft/secagg/shamir.py",
        "for _ in range(threshold - 1)]",
        "for _ in range(threshold - 2)]",
        (
            "tests/test_secagg.py::"
            "test_shamir_polynomial_has_degree_t_minus_1_so_t_minus_1_shares_reveal_nothing",
        ),
    ),
    Bug(
        "DP noise ignores its standard deviation",
        "fedpeft/privacy.py",
        '"dp-noise", server_round).normal(0.0, std, n)',
        '"dp-noise", server_round).normal(0.0, 1.0, n)',
        (
            "tests/test_dp.py::test_noise_has_the_requested_spread",
            "tests/test_dp.py::test_lora_release_noise_std_is_z_times_clip_over_k",
        ),
    ),
    Bug(
        "DP accountant not restored on resume",
        "fedpeft/algorithms/wrappers/dp.py",
        '        self.accountant.load_state_dict(state["accountant"])',
        "        pass",
        ("tests/test_dp.py::test_accountant_is_restored_with_the_strategy_state",),
    ),
    Bug(
        "round retry does not restore the strategy state",
        "fedpeft/server/coordinator.py",
        "                self.strategy.load_state_dict(snapshot)",
        "                pass",
        (
            "tests/test_resume.py::test_a_retried_round_starts_from_the_state_before_the_failed_attempt",
        ),
    ),
    Bug(
        "FedKSeed gradient estimate doubled",
        "fedpeft/zo/local.py",
        "g = (lp - lm) / (2 * spec.eps)",
        "g = (lp - lm) / spec.eps",
        (
            "tests/test_zo.py::test_fedkseed_scalar_is_the_directional_derivative_along_its_direction",
        ),
    ),
    Bug(
        "FedIT weights taken in reply order, factors in id order",
        "fedpeft/algorithms/fedavg.py",
        "weights_of(ordered) if self.config.weighted",
        "weights_of(updates) if self.config.weighted",
        ("tests/test_fedavg.py::test_weights_follow_their_clients_whatever_the_reply_order",),
    ),
    Bug(
        "FFA-LoRA clients told to train A too",
        "fedpeft/algorithms/ffa.py",
        'ranks, parts="B")',
        'ranks, parts="AB")',
        ("tests/test_hetero_exactness.py::test_one_factor_strategies_ask_for_one_factor",),
    ),
    Bug(
        "unit_scale drops alpha / r",
        "fedpeft/lora/rank_ops.py",
        "return f.a.double(), f.b.double() * f.scale",
        "return f.a.double(), f.b.double()",
        (
            "tests/test_hetero_exactness.py::test_unit_scale_folds_alpha_over_rank_into_b",
            "tests/test_hetero_exactness.py::test_flora_is_exact_for_mixed_ranks",
        ),
    ),
]


def _copy(dest: Path) -> None:
    for name in ("fedpeft", "tests", "simulations"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _plant(dest: Path, bug: Bug) -> None:
    path = dest / bug.path
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.path}: the line to change occurs {text.count(bug.old)} times")
    path.write_text(text.replace(bug.old, bug.new))


def _passes(where: Path, tests: tuple[str, ...]) -> bool:
    env = {**os.environ, "PYTHONPATH": str(where)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:randomly", *tests]
    return subprocess.run(cmd, cwd=where, env=env, capture_output=True).returncode == 0


def main() -> int:
    """Run every bug (or ``--only N``) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, help="run bug N (1-based) only")
    parser.add_argument("--quick", action="store_true", help="the smoke run: bug 4 only")
    args = parser.parse_args()
    if args.quick:
        args.only = args.only or 4
    chosen = list(enumerate(BUGS, 1))
    if args.only:
        chosen = [chosen[args.only - 1]]
    bad = 0
    print(f"{'#':>2}  {'planted bug':<56} {'clean':<6} {'bug':<7} test")
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        _copy(clean)
        for i, bug in chosen:
            mutated = Path(tmp) / f"bug{i}"
            _copy(mutated)
            _plant(mutated, bug)
            ok_clean = _passes(clean, bug.tests)
            killed = not _passes(mutated, bug.tests)
            bad += (not ok_clean) + (not killed)
            names = ", ".join(t.split("::")[-1] for t in bug.tests)
            print(
                f"{i:>2}  {bug.name:<56} {'pass' if ok_clean else 'FAIL':<6} "
                f"{'killed' if killed else 'SURVIVED':<7} {names}",
                flush=True,
            )
            shutil.rmtree(mutated)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
