"""The Flower app components of a deployed fedpeft run: what ``flwr run`` starts.

``fedpeft server`` writes a small Flower app folder whose ``pyproject.toml`` names
``fedpeft.deploy.apps:server_app`` and ``fedpeft.deploy.apps:client_app`` and whose run config
carries the whole scenario as TOML text (``scenario``), plus ``overrides`` and the
coordinator's output folder ``out``. The same scenario therefore reaches the coordinator and
every node, exactly as ``fedpeft simulate`` would run it.

- ``server_app``: the fedpeft coordinator (:func:`fedpeft.server.app.run_server`) on the
  SuperLink's grid, wrapped in :class:`PollingGrid` (Flower's ``HttpGrid`` sleeps 3 s between
  pulls; fedpeft polls every 0.1 s, backing off to 1 s while nothing comes, and stops pulling a
  reply past its size limit). If the coordinator fails, the reason goes to ``OUT/outcome.json``
  for ``fedpeft server`` to print.
- ``client_app``: forwards every message to the node's long-lived model worker
  (:mod:`fedpeft.deploy.worker`, socket path in the node config key ``worker``), so the base
  model loads once per node. Without ``worker`` it runs the fedpeft ClientApp in its own
  per-message process and reloads the model every time (works, slowly; a warning says so).

This module imports neither torch nor transformers at import time: Flower imports it in a new
process for every message.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedpeft._flwr import GridWrapper, pull_bounded

__all__ = ["FORWARDED", "OUTCOME", "POLL_S", "PollingGrid", "client_app", "server_app"]

POLL_S = 0.1
MAX_POLL_S = 1.0  # idle polling backs off to this: the SuperLink serves nodes too
DEFAULT_REPLY_LIMIT = 16_000_000  # replies nobody announced a limit for are small
log = logging.getLogger(__name__)


class PollingGrid(GridWrapper):
    """Any ``Grid``, with ``send_and_receive`` polling every ``poll_s`` seconds (backing off to
    ``max_poll_s`` while nothing comes) and replies bounded in bytes.

    A reply pulled past its destination node's limit (:meth:`limit_replies`, else
    ``default_limit``) is not pulled further (:func:`fedpeft._flwr.pull_bounded`): the
    coordinator's memory does not grow with what a node pushes.
    """

    def __init__(
        self,
        grid: Grid,
        poll_s: float = POLL_S,
        max_poll_s: float = MAX_POLL_S,
        default_limit: int = DEFAULT_REPLY_LIMIT,
    ) -> None:
        super().__init__(grid)
        self._poll_s = poll_s
        self._max_poll_s = max_poll_s
        self._default_limit = default_limit
        self._limits: dict[int, int] = {}

    def limit_replies(self, limits: Mapping[int, int]) -> None:
        """Byte limits, per destination node, for the replies of the next exchange."""
        self._limits = dict(limits)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` seconds have passed."""
        sent = list(messages)
        by_node, self._limits = self._limits, {}
        ids = list(self.push_messages(sent))
        limits = {
            mid: by_node.get(m.metadata.dst_node_id, self._default_limit)
            for mid, m in zip(ids, sent, strict=True)
            if mid
        }
        waiting = set(limits)
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        delay = self._poll_s
        while waiting:
            got = pull_bounded(self.grid, waiting, limits)
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (timeout is not None and time.monotonic() >= end):
                break
            delay = self._poll_s if got else min(delay * 1.5, self._max_poll_s)
            time.sleep(delay)
        return replies


# ---------------------------------------------------------------------------------- server
server_app = ServerApp()
OUTCOME = "outcome.json"  # why the coordinator stopped early, for `fedpeft server`


def _write_outcome(out: Path, err: BaseException) -> None:
    from fedpeft.errors import clip

    if isinstance(err, KeyboardInterrupt):  # Flower interrupts a task its SuperLink dropped
        why = (
            "the SuperLink stopped this run's coordinator (its task heartbeat was not "
            "accepted: the run was stopped, or the SuperLink lost or restarted it)"
        )
    else:
        why = f"{type(err).__name__}: {err}"
    text = json.dumps({"error": clip(why, 4096), "time": time.time()})
    (out / OUTCOME).write_text(text + "\n", encoding="utf-8")


@server_app.main()
def _coordinate(grid: Grid, context: Context) -> None:
    from fedpeft.config.load import config_to_dict, dump_toml, load_config, parse_overrides
    from fedpeft.config.rules import deployment_problems
    from fedpeft.errors import ConfigError
    from fedpeft.server.app import run_server
    from fedpeft.server.results import RunReporter

    run = context.run_config
    missing = [k for k in ("scenario", "out") if not isinstance(run.get(k), str)]
    if missing:
        raise ConfigError(
            f"the run config lacks {missing}: submit fedpeft runs with `fedpeft server`, "
            "which writes them into the app's pyproject.toml"
        )
    overrides = parse_overrides(str(run.get("overrides", "")).split())
    cfg = load_config(None, overrides, text=str(run["scenario"]))
    if problems := deployment_problems(cfg):
        raise ConfigError(problems)
    out = Path(str(run["out"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(dump_toml(config_to_dict(cfg)), encoding="utf-8")
    resume = bool(run.get("resume", False))
    reporter = RunReporter(out, cfg.federation.rounds, quiet=True, resume=resume)
    (out / OUTCOME).unlink(missing_ok=True)
    try:
        summary = run_server(PollingGrid(grid), cfg, out, reporter, resume=resume)
    except BaseException as err:  # written for `fedpeft server`, which reports why
        _write_outcome(out, err)
        raise
    log.warning(
        "fedpeft: run finished; eval loss %s -> %s; results in %s",
        summary["before"].get("eval_loss"),
        summary["after"].get("eval_loss"),
        out,
    )


# ---------------------------------------------------------------------------------- client
client_app = ClientApp()


@functools.cache
def _local_app() -> ClientApp:
    from fedpeft.client.app import make_client_app

    log.warning(
        "fedpeft: this node has no model worker (node config 'worker'); the base model "
        "loads in every message's process. Start the node with `fedpeft client`."
    )
    return make_client_app(None)


def _forward(msg: Message, context: Context) -> Message:
    path = context.node_config.get("worker")
    if not isinstance(path, str) or not path:
        return _local_app()(msg, context)
    from fedpeft.deploy.worker import call_worker

    reply = call_worker(path, msg, context)
    context.state = reply.state
    if reply.error is not None:
        raise RuntimeError(f"model worker: {reply.error}")
    assert reply.content is not None
    return Message(reply.content, reply_to=msg)


# Every message type the fedpeft ClientApp handles goes to the same forwarder.
FORWARDED = (
    ("query", "info"),
    ("train", "lora"),
    ("train", "zo"),
    ("query", "secagg"),
    ("query", "refused"),
    ("evaluate", "lora"),
)
for _category, _action in FORWARDED:
    getattr(client_app, _category)(_action)(_forward)
