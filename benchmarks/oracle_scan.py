"""List test assertions whose expected side may be computed by the code under test.

A test should compare what fedpeft computes against a value obtained independently (by hand,
a closed form, a library, or a naive reference written in the test). This scan cannot decide
that; it lists the candidates for a person to review:

- ``compare``: an ``assert a == b`` (or ``!=``, ``<``, ...) in a test function where *every*
  side depends on something imported from ``fedpeft`` (directly, or through a local name
  assigned from such an expression). Round trips, determinism checks ("same seed, same
  result"), invariances and comparisons of two code paths show up here; they are legitimate
  when the property itself is the claim, and suspect when one side is the "expected" value;
- ``reference``: an assignment to a name like ``want``/``expected``/``ideal``/``ref`` whose
  value calls fedpeft code or a wire type's ``delta()``.

    .venv/bin/python benchmarks/oracle_scan.py            # scan tests/
    .venv/bin/python benchmarks/oracle_scan.py FILE...    # scan the given files

Prints one line per candidate (``path:line: kind: function: source``) and the count.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = re.compile(r"want|expect|ideal|ref|truth|exact|oracle")
COMPARE_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedpeft"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {
                (a.asname or a.name).split(".")[0]
                for a in node.names
                if a.name.startswith("fedpeft")
            }
    return names


def _uses(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(x, ast.Name) and x.id in names for x in ast.walk(node))


def _targets(node: ast.Assign) -> list[str]:
    return [x.id for t in node.targets for x in ast.walk(t) if isinstance(x, ast.Name)]


def scan(path: Path) -> list[str]:
    """Candidate lines of one test file."""
    tree = ast.parse(path.read_text(), str(path))
    imported = _imported(tree)
    found = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        if not fn.name.startswith("test"):
            continue
        tainted = set(imported)
        for _ in range(2):  # twice, so a name assigned from a later-tainted one is caught
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and _uses(node.value, tainted):
                    tainted |= set(_targets(node))
        for node in ast.walk(fn):
            if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare):
                sides = [node.test.left, *node.test.comparators]
                if all(isinstance(op, COMPARE_OPS) for op in node.test.ops) and all(
                    _uses(s, tainted) for s in sides
                ):
                    found.append(f"{path}:{node.lineno}: compare: {fn.name}: "
                                 f"{ast.unparse(node.test)[:120]}")  # fmt: skip
            if isinstance(node, ast.Assign) and any(EXPECTED.search(t) for t in _targets(node)):
                delta = any(
                    isinstance(x, ast.Call)
                    and isinstance(x.func, ast.Attribute)
                    and x.func.attr == "delta"
                    for x in ast.walk(node.value)
                )
                if delta or _uses(node.value, imported):
                    found.append(f"{path}:{node.lineno}: reference: {fn.name}: "
                                 f"{ast.unparse(node)[:120]}")  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the candidates of the given files (default: every tests/test_*.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    files = args.files or sorted((ROOT / "tests").glob("test_*.py"))
    lines = [line for f in files for line in scan(f)]
    print("\n".join(lines))
    print(f"{len(lines)} candidates in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
