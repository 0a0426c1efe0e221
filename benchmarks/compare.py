"""Side-by-side table of finished runs (e.g. the default scenario and its centralized reference).

.venv/bin/fedpeft simulate --config simulations/default.toml --out runs/default
.venv/bin/fedpeft simulate --config simulations/centralized.toml --out runs/centralized
.venv/bin/python benchmarks/compare.py runs/default runs/centralized

``--quick`` makes its own two runs (the tiny scenario for one round, federated and
centralized) in a temporary folder and compares them. Writes ``benchmarks/results/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _bench import QUICK_OVERRIDES, add_quick, results_path, simulate_cli


def table(dirs: list[str]) -> dict[str, dict[str, float]]:
    """Print the table of the runs in ``dirs``; returns its rows by run folder name."""
    runs = {d: json.loads((Path(d) / "summary.json").read_text()) for d in dirs}
    metric = next(
        (
            k
            for s in runs.values()
            for k in s["after"]
            if k.startswith("eval_") and k != "eval_loss"
        ),
        None,
    )
    head = f"{'run':<22}{'loss before':>12}{'loss after':>12}"
    if metric:
        head += f"{metric + ' before':>20}{metric + ' after':>20}"
    head += f"{'up B/client-rnd':>17}{'down B/client-rnd':>19}{'wall s':>9}"
    print(head)
    rows = {}
    for d, s in runs.items():
        b, a = s["before"], s["after"]
        line = f"{Path(d).name:<22}{b['eval_loss']:>12.4f}{a['eval_loss']:>12.4f}"
        if metric:
            line += f"{b.get(metric, float('nan')):>20.4f}{a.get(metric, float('nan')):>20.4f}"
        up, down = s["bytes_up_per_client_round"], s["bytes_down_per_client_round"]
        line += f"{up:>17.0f}{down:>19.0f}{s['wall_s']:>9.0f}"
        print(line)
        rows[Path(d).name] = {"loss_before": b["eval_loss"], "loss_after": a["eval_loss"],
                              "up": up, "down": down, "wall_s": s["wall_s"]}  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", help="finished run folders")
    add_quick(ap)
    args = ap.parse_args()
    if not args.quick and not args.dirs:
        ap.error("give run folders to compare, or --quick")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = list(args.dirs)
        if args.quick:
            centralized = ["federation.centralized=true", "federation.min_clients=1"]
            for name, extra in (("federated", []), ("centralized", centralized)):
                simulate_cli("tiny.toml", Path(tmp) / name, [*extra, *QUICK_OVERRIDES])
                dirs.append(str(Path(tmp) / name))
        rows = table(dirs)
    results_path("compare.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
