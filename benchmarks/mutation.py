"""Mutation testing of the core maths and safety modules, with a per-module report.

mutmut (3.8, ``pip install -e ".[mutation]"``) was chosen over cosmic-ray because it records
which tests reach each function in one traced run and then runs only those tests per mutant,
in children forked from a process that has already imported torch and the suite; cosmic-ray
starts the test command afresh for every mutant (~5 s of imports each here, ~5 h for the
~3,900 mutants). The modules and the tests it runs are set in ``[tool.mutmut]`` of
``pyproject.toml``; simulations are left out (``FEDPEFT_MUTATION=1``, see
``tests/conftest.py``), so a mutant only a simulation would catch counts as surviving.

    .venv/bin/python benchmarks/mutation.py --run   # mutate and test (22 min on 2 cores)
    .venv/bin/python benchmarks/mutation.py         # the report of the last run only

A mutant counts as killed when a test failed or timed out. "no tests" (no unit test reaches
the function) counts as surviving. Mutants judged equivalent (no input can tell them apart
from the original) are listed with the reason in ``benchmarks/mutation_equivalent.txt`` and
left out of the score; the report prints them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).parent / "mutmut"
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def _results() -> dict[str, str]:
    out = subprocess.run(
        [str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    found = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status
    return found


def _module(name: str) -> str:
    """``fedpeft.secagg.shamir.x_split__mutmut_3`` -> ``fedpeft/secagg/shamir.py``."""
    head = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
    return head.replace(".", "/") + ".py"


def _equivalent() -> dict[str, str]:
    out = {}
    if EQUIVALENT.is_file():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def main() -> int:
    """Optionally run mutmut, then print the per-module table and the survivors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run mutmut from scratch first")
    parser.add_argument("--survivors", action="store_true", help="list every survivor")
    args = parser.parse_args()
    if args.run:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        env = {**os.environ, "FEDPEFT_MUTATION": "1"}
        subprocess.run([str(MUTMUT), "run"], cwd=ROOT, env=env, check=False)
    results, equivalent = _results(), _equivalent()
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in sorted(results.items()):
        mod = _module(name)
        if name in equivalent:
            by_module[mod]["equivalent"] += 1
        elif status in KILLED:
            by_module[mod]["killed"] += 1
        elif status == "not checked":
            by_module[mod]["not checked"] += 1
        else:
            by_module[mod]["survived" if status == "survived" else "no tests"] += 1
            survivors[mod].append(f"{name} ({status})")
    cols = ("killed", "survived", "no tests", "equivalent", "not checked")
    print(f"{'module':<34}" + "".join(f"{c:>12}" for c in cols) + f"{'score':>8}")
    total: Counter[str] = Counter()
    for mod in sorted(by_module):
        c = by_module[mod]
        total.update(c)
        print(f"{mod:<34}" + "".join(f"{c[k]:>12}" for k in cols) + f"{_score(c):>8}")
    print(f"{'all':<34}" + "".join(f"{total[k]:>12}" for k in cols) + f"{_score(total):>8}")
    if equivalent:
        print(f"\nequivalent ({len(equivalent)}, left out of the score):")
        for name, reason in sorted(equivalent.items()):
            print(f"  {name}: {reason}")
    if args.survivors:
        for mod in sorted(survivors):
            print(f"\n{mod}:")
            for s in survivors[mod]:
                print(f"  {s}")
    return 0


def _score(c: Counter[str]) -> str:
    checked = c["killed"] + c["survived"] + c["no tests"]
    return f"{100 * c['killed'] / checked:.1f}%" if checked else "-"


if __name__ == "__main__":
    raise SystemExit(main())
