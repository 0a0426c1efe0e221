"""What a run writes and shows: ``metrics.jsonl``, ``summary.json``, a progress bar, a table.

``metrics.jsonl`` has one JSON object per round (round 0 is the evaluation before training)
with at least ``round``, ``train_loss``, ``eval_loss``, ``bytes_up``, ``bytes_down``, ``wall_s``
and ``clients``; bytes are the serialized Flower messages of that round summed over clients
(``*_per_client`` divides by the clients that replied / were asked; ``payload_*`` counts only
the tensors). ``summary.json`` holds before/after evaluation and per client-round bytes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fedpeft.config import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.server.coordinator import RunResult

__all__ = ["RunReporter", "format_summary", "summarize"]

TIME_KEYS = ("wall_s", "eval_s", "train_s_max", "device_forward_s")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(cfg: RunConfig, result: RunResult, adapter_dir: str) -> dict[str, Any]:
    """Before/after evaluation, bytes per client-round and time of a finished run."""
    rows = result.rows
    trained = [r for r in rows if r["round"] > 0]
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    metric = f"eval_{cfg.data.metric}"

    personal = (
        ["personal_eval_loss_mean", "personal_eval_loss_worst10"] if cfg.eval.personalized else []
    )

    def pick(row: dict[str, Any] | None) -> dict[str, Any]:
        return {k: row.get(k) for k in ("round", "eval_loss", metric, *personal)} if row else {}

    return {
        "scenario": cfg.name,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "num_clients": len(result.clients),
        "discovery": result.discovery,
        "rounds": len(trained),
        "before": pick(evaluated[0] if evaluated else None),
        "after": pick(evaluated[-1] if evaluated else None),
        "bytes_up_per_client_round": _mean([r["bytes_up_per_client"] for r in trained]),
        "bytes_down_per_client_round": _mean([r["bytes_down_per_client"] for r in trained]),
        "payload_up_per_client_round": _mean(
            [r["payload_up"] / max(r["clients"], 1) for r in trained]
        ),
        "total_bytes_up": sum(r["bytes_up"] for r in trained),
        "total_bytes_down": sum(r["bytes_down"] for r in trained),
        "failures": sum(len(r.get("failures", {})) for r in trained),
        "stopped": result.stopped,
        "dp_epsilon": trained[-1].get("dp_epsilon") if trained else None,
        "wall_s": result.wall_s,
        "adapter": adapter_dir,
        **result.setup_bytes,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_summary(s: dict[str, Any], metric: str) -> str:
    """The end-of-run table, as plain text."""
    key = f"eval_{metric}"
    b, a = s["before"], s["after"]
    lines = [
        f"fedpeft · {s['scenario']} · {s['model']} · {s['strategy']} · "
        f"{s['num_clients']} clients × {s['rounds']} rounds",
        f"  {'':28}{'before':>10}{'after':>10}",
        f"  {'eval loss':28}{_fmt(b.get('eval_loss')):>10}{_fmt(a.get('eval_loss')):>10}",
    ]
    if metric != "none":
        lines.append(f"  {'eval ' + metric:28}{_fmt(b.get(key)):>10}{_fmt(a.get(key)):>10}")
    for stat, what in (("mean", "mean"), ("worst10", "worst 10%")):
        name = f"personal_eval_loss_{stat}"  # eval.personalized: each client's own model
        if name in a:
            text = f"own-model loss, {what}"
            lines.append(f"  {text:28}{_fmt(b.get(name)):>10}{_fmt(a.get(name)):>10}")
    lines += [
        f"  {'bytes up / client-round':28}{_fmt_bytes(s['bytes_up_per_client_round']):>20}"
        f"  (tensors {_fmt_bytes(s['payload_up_per_client_round'])})",
        f"  {'bytes down / client-round':28}{_fmt_bytes(s['bytes_down_per_client_round']):>20}",
        *_joined(s.get("discovery") or {}),
        f"  {'client failures':28}{s['failures']:>20}",
        f"  {'wall time':28}{s['wall_s']:>18.1f} s",
        f"  {'adapter (peft format)':28}  {s['adapter']}",
    ]
    return "\n".join(lines)


def _joined(found: dict[str, Any]) -> list[str]:
    """A line on who joined, when some expected client did not or a node was refused."""
    if not found or (not found.get("missing") and not found.get("refused")):
        return []
    text = f"{len(found['joined'])} of {found['expected']}"
    extra = [f"missing {', '.join(found['missing'])}"] if found.get("missing") else []
    extra += [f"{len(found['refused'])} node(s) refused"] if found.get("refused") else []
    return [f"  {'clients joined':28}{text:>20}  ({'; '.join(extra)}: see summary.json)"]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


class RunReporter:
    """Writes ``metrics.jsonl`` as rounds finish and shows a progress bar over rounds.

    Parameters
    ----------
    out_dir : Path
        Run folder (created).
    rounds : int
        Total rounds, for the progress bar.
    quiet : bool
        No progress bar and no table (CI and logs).
    stream : TextIO
        Where the bar and table go.
    tensorboard : bool
        Also write every numeric metric of a round as a TensorBoard scalar (step = round)
        to ``out_dir/tensorboard`` (needs the ``tensorboard`` package).
    resume : bool
        The run continues from a checkpoint: ``metrics.jsonl`` keeps its rows until the
        run writes them again (it does so before waiting for clients).
    """

    def __init__(
        self,
        out_dir: Path,
        rounds: int,
        quiet: bool = False,
        stream: TextIO = sys.stderr,
        tensorboard: bool = False,
        resume: bool = False,
    ) -> None:
        from tqdm import tqdm

        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._fresh = not resume  # resuming, the old rows stay until the run writes its own
        if self._fresh:
            self.path.write_text("")
        self.quiet = quiet
        self.stream = stream
        self._replies = 0
        self._started = False
        self._latest = ""  # the last losses shown, kept while a round's replies come in
        self._phase = ""  # what the run does before its first round
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise FedpeftError(
                    "--tensorboard needs the tensorboard package: "
                    "pip install 'fedpeft[tensorboard]'"
                ) from err
            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.bar = tqdm(
            total=rounds,
            desc="rounds",
            unit="round",
            disable=quiet,
            file=stream,
            dynamic_ncols=True,
        )

    def on_row(self, row: dict[str, Any]) -> None:
        """Append a round's metrics and advance the bar."""
        self._replies = 0
        with self.path.open("a" if self._fresh else "w", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(row), sort_keys=True) + "\n")
        self._fresh = True
        if self.writer is not None:
            self._scalars(row)
        latest = [
            f"{k} {row[k]:.3f}" for k in ("train_loss", "eval_loss") if row.get(k) is not None
        ]
        self._latest = ", ".join(latest) or self._latest
        self.bar.set_postfix_str(self._latest)
        if row["round"] == 0:
            self._started = True
            self._time_rounds_from_now()  # the ETA counts training rounds only
            return
        self.bar.update(1)

    def on_phase(self, text: str) -> None:
        """Show what the run does before its rounds (loading, waiting for clients, evaluating
        the start model). A resumed run's restored rounds are behind the bar by now: the ETA
        counts only the rounds run from here."""
        self._phase = text
        if self.bar.n:
            self._time_rounds_from_now()
        self.bar.set_postfix_str(f"{self._latest} | {text}" if self._latest else text)

    def _time_rounds_from_now(self) -> None:
        """Restart the bar's clock, keeping its count (tqdm's rate and ETA start afresh)."""
        done = self.bar.n
        self.bar.reset()
        self.bar.initial = self.bar.n = self.bar.last_print_n = done
        self.bar.refresh()

    def _scalars(self, row: dict[str, Any]) -> None:
        """Every finite number of ``row`` as a TensorBoard scalar at step ``round``."""
        for key, value in sorted(row.items()):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and key != "round" and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), int(row["round"]))
        self.writer.flush()

    def on_reply(self, node_id: int, reply: object) -> None:
        """Show progress inside a round (the in-process grid calls this per reply)."""
        self._replies += 1
        where = (self._phase or "setup") if not self._started else f"round {self.bar.n + 1}"
        progress = f"{where}: {self._replies} client replies"
        self.bar.set_postfix_str(f"{self._latest} | {progress}" if self._latest else progress)

    def finish(self, summary: dict[str, Any], metric: str) -> None:
        """Write ``summary.json`` and print the table."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        (self.out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
        if not self.quiet:
            print(format_summary(summary, metric), file=sys.stdout)
