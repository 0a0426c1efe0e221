"""Side-by-side table of finished runs (e.g. the default scenario and its centralized reference).

.venv/bin/fedpeft simulate --config simulations/default.toml --out runs/default
.venv/bin/fedpeft simulate --config simulations/centralized.toml --out runs/centralized
.venv/bin/python benchmarks/compare.py runs/default runs/centralized
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
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
    for d, s in runs.items():
        b, a = s["before"], s["after"]
        line = f"{Path(d).name:<22}{b['eval_loss']:>12.4f}{a['eval_loss']:>12.4f}"
        if metric:
            line += f"{b.get(metric, float('nan')):>20.4f}{a.get(metric, float('nan')):>20.4f}"
        up, down = s["bytes_up_per_client_round"], s["bytes_down_per_client_round"]
        line += f"{up:>17.0f}{down:>19.0f}{s['wall_s']:>9.0f}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
