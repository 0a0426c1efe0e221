"""The device client: a Flower ``ClientApp`` that trains LoRA adapters on a shared base model.

Handlers (Flower routes ``<category>.<action>`` message types to them):

- ``query.info``: reply with a :class:`~fedpeft.wire.messages.ClientInfo` (client id, example count,
  device, base-model fingerprint).
- ``train.lora``: decode a :class:`~fedpeft.wire.messages.TrainInstruction`, train, reply with a
  :class:`~fedpeft.wire.messages.LoraUpdate`.
- ``train.zo``: decode a :class:`~fedpeft.wire.zo.ZoInstruction`, run the algorithm's
  seed/scalar client half (its strategy class's ``trainer``, a
  :class:`~fedpeft.zo.trainer.ZoTrainer`: sync, local loop), reply with a
  :class:`~fedpeft.wire.zo.ZoUpdate`.
- ``query.refused``: the coordinator left this node out of the run (wrong client id, a
  client id another node holds, another base model); the reason is logged on the node.
- ``evaluate.lora``: evaluate the instruction's adapter on this client's share of the
  held-out split, reply with an :class:`~fedpeft.wire.messages.EvalReport` (federated evaluation).

The base model and the client's tokenized data come from ``fedpeft.cache.PROCESS_CACHE``: they
are built once per process and shared by every virtual client the process runs; a round only
switches adapter weights. An exception in a handler becomes an error reply (Flower's runtime
and the in-process grid both do this), which the coordinator records as that client's failure.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.algorithms.registry import resolve
from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.client.feedback_state import load_feedback, save_feedback
from fedpeft.client.node_state import NodeState
from fedpeft.client.secure import keep_lora, keep_zo, secagg_query
from fedpeft.client.trainer import ClientData, make_trainer
from fedpeft.config import RunConfig
from fedpeft.config.load import load_config, parse_overrides
from fedpeft.config.sections import parse_quantization_label
from fedpeft.data.clients import client_eval_records, client_records
from fedpeft.data.tasks import format_pairs
from fedpeft.data.tokenize import encode_pairs
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.evaluation import EvalSet, Evaluator
from fedpeft.lora.handle import ModelHandle
from fedpeft.models import fingerprint_mismatch, get_model, model_key
from fedpeft.wire.messages import (
    HEADER,
    PERSONAL,
    ClientInfo,
    EvalReport,
    Header,
    TrainInstruction,
    decode_instruction,
    decode_refusal,
    encode_client_info,
    encode_eval_report,
    encode_update,
)
from fedpeft.wire.zo import ZoSpec, decode_zo_instruction, encode_zo_update
from fedpeft.zo.runtime import discard_changed_models, get_runtime
from fedpeft.zo.trainer import zo_trainer_of

__all__ = [
    "NODE_OVERRIDES",
    "NODE_PROPERTIES",
    "client_data",
    "client_evalset",
    "make_client_app",
    "node_overrides",
    "own_data",
    "partition_id",
]

log = logging.getLogger(__name__)


def partition_id(context: Context) -> int:
    """This node's data partition: ``partition-id`` from its node config (simulation)."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise ConfigError(
            f"node {context.node_id} has no 'partition-id' in its node config "
            f"({dict(context.node_config)}); start it with --node-config 'partition-id=N'"
        )
    return int(value)


def client_data(
    cfg: RunConfig,
    handle: ModelHandle,
    pid: int,
    cache: ProcessCache = PROCESS_CACHE,
    own: bool = False,
) -> ClientData:
    """The tokenized training examples of partition ``pid`` (built once per process).

    ``own``: ``data.path`` is this client's own file (all of it), not a file to partition.
    """

    def build() -> ClientData:
        pairs = format_pairs(client_records(cfg, pid, cache, own), cfg.data)
        examples = encode_pairs(
            handle.tokenizer, pairs, cfg.train.max_seq_len, cfg.data.chat_template
        )
        return ClientData(client_id=str(pid), examples=examples)

    # the sections' reprs name every field (an attack's label_flip changes its records)
    key = "client-data:" + "|".join(
        (repr(cfg.data), repr(cfg.federation), repr(cfg.attack), str(cfg.train.max_seq_len),
         model_key(cfg.model), str(pid), str(own))
    )  # fmt: skip
    return cache.get(key, build)


def client_evalset(
    cfg: RunConfig,
    handle: ModelHandle,
    pid: int,
    cache: ProcessCache = PROCESS_CACHE,
    own: bool = False,
) -> EvalSet:
    """Partition ``pid``'s tokenized share of the held-out split (built once per process)."""
    key = "client-eval:" + json.dumps(
        [asdict(cfg.data), asdict(cfg.federation), asdict(cfg.eval), cfg.train.max_seq_len,
         model_key(cfg.model), pid, own],
        sort_keys=True,
    )  # fmt: skip
    return cache.get(
        key, lambda: EvalSet.build(cfg, client_eval_records(cfg, pid, cache, own), handle.tokenizer)
    )


def base_model(run: RunConfig, cache: ProcessCache, spec: ZoSpec | None = None) -> ModelHandle:
    """The base model to serve a message with: a LoRA message (``spec`` None), or a
    zeroth-order one with ``spec``.

    A full-model zeroth-order run tunes the process's shared base weights in place, and a
    deployed node's worker (or any process) serves the runs that follow it with the same
    model. Rewinding those weights by subtracting the coefficients again is exact only up to
    float32 rounding, so a message that needs other weights than that run's (any LoRA
    message, or a zeroth-order run with another spec) gets the model loaded again, bit for
    bit the true base: one load per switch away from a full-model run, which a node serves
    rarely (between runs), never per message of a run.
    """
    handle = get_model(run.model, cache)
    active = getattr(handle, "zo_active", None)
    if active is not None and active.spec.target == "full" and active.spec != spec:
        log.warning(
            "fedpeft: a full-model zeroth-order run changed %s's weights in place; loading "
            "the base model again for this message",
            handle.name,
        )
        discard_changed_models(cache)
        handle = get_model(run.model, cache)
    return handle


def _decode(
    fixed: RunConfig | None, context: Context, cache: ProcessCache, msg: Message
) -> tuple[RunConfig, ModelHandle, TrainInstruction]:
    run = _config(fixed, context, cache)
    handle = base_model(run, cache)
    ins = decode_instruction(msg.content)
    _check_fingerprint(ins.header.model_fingerprint, handle)
    return run, handle, ins


def _check_strategy(theirs: str, run: RunConfig) -> None:
    """The coordinator's algorithm must be the one whose client half this node runs (its own
    scenario's; a name from the network never picks code to load)."""
    if theirs and theirs != run.strategy.name:
        raise ProtocolError(
            f"the coordinator runs algorithm {theirs!r}, this node's scenario runs "
            f"{run.strategy.name!r}; run the same scenario on both sides"
        )


def _check_fingerprint(theirs: str, handle: ModelHandle) -> None:
    """The coordinator stamps each instruction with the base model it admitted this node with
    (its own, or the same weights in a quantization it admits): this node must have it."""
    if why := fingerprint_mismatch(handle.fingerprint, theirs):
        raise ProtocolError(f"this node ({handle.name}) and the coordinator differ: {why}")


# Node config keys a deployed node may set, and the scenario keys they override on that node.
NODE_OVERRIDES = {
    "device": "model.device",
    "dtype": "model.dtype",
    "data-path": "data.path",
}
# Node config keys advertised to the coordinator in ClientInfo.properties.
NODE_PROPERTIES = {"max-rank": "max_rank", "memory-mb": "memory_mb"}


def node_overrides(context: Context) -> dict[str, Any]:
    """The scenario overrides this node's config asks for (``device``, ``dtype``, ``data-path``,
    ``quantization``: a label such as ``nf4`` or ``nf4-dq``, 4-bit with double quantization)."""
    conf = context.node_config
    out: dict[str, Any] = {
        NODE_OVERRIDES[k]: v for k, v in sorted(conf.items()) if k in NODE_OVERRIDES
    }
    if "quantization" in conf:
        kind, dq = parse_quantization_label(str(conf["quantization"]))
        out["model.quantization"], out["model.double_quant"] = kind, dq
    return out


def own_data(context: Context) -> bool:
    """Whether this node's data file is its own (node config ``own-data``): it trains on all
    of it instead of its ``partition-id`` share of the scenario's file."""
    return bool(context.node_config.get("own-data", 0))


def _simulated_node(cfg: RunConfig, context: Context) -> RunConfig:
    """``cfg`` with this node's own base-model quantization: its node config's
    ``quantization`` if it names one, else ``simulation.node_quantization`` cycled over
    partition ids."""
    conf, labels = context.node_config, cfg.simulation.node_quantization
    if "quantization" in conf:
        label = str(conf["quantization"])
    elif labels:
        label = labels[int(conf.get("partition-id", 0)) % len(labels)]
    else:
        return cfg
    kind, dq = parse_quantization_label(label)
    if (kind, dq) == (cfg.model.quantization, cfg.model.double_quant):
        return cfg
    return replace(cfg, model=replace(cfg.model, quantization=kind, double_quant=dq))


def _config(fixed: RunConfig | None, context: Context, cache: ProcessCache) -> RunConfig:
    if fixed is not None:
        return _simulated_node(fixed, context)
    run = context.run_config
    overrides = str(run.get("overrides", "")).split()
    local = node_overrides(context)
    text, path = run.get("scenario"), run.get("config")
    key = "config:" + json.dumps([path, text, overrides, local], sort_keys=True)

    def build() -> RunConfig:
        merged = {**parse_overrides(overrides), **local}
        if isinstance(text, str) and text:
            return load_config(None, merged, text)
        if not isinstance(path, str):
            raise ConfigError(
                "the run config has neither 'scenario' (TOML text) nor 'config' (scenario path)"
            )
        return load_config(path, merged)

    return _simulated_node(cache.get(key, build), context)


def make_client_app(cfg: RunConfig | None = None, cache: ProcessCache = PROCESS_CACHE) -> ClientApp:
    """Build the fedpeft ``ClientApp``.

    Parameters
    ----------
    cfg : RunConfig | None
        The scenario; ``None`` reads it from the run config, as a deployed run passes it:
        ``scenario`` (TOML text) or ``config`` (a TOML path), plus optional ``overrides``
        (``KEY=VALUE ...``); the node config's ``device``, ``dtype`` and ``data-path``
        override the model device/dtype and data path on that node, and ``own-data = 1``
        makes the node train on all of its file rather than its partition.
    cache : ProcessCache
        Where the base model and data live (the process cache by default).

    Returns
    -------
    ClientApp
        With ``query.info``, ``train.lora``, ``train.zo``, ``query.secagg`` and
        ``evaluate.lora`` handlers.
    """
    app = ClientApp()

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        run = _config(cfg, context, cache)
        handle = get_model(run.model, cache)
        pid = partition_id(context)
        data = client_data(run, handle, pid, cache, own_data(context))
        run_id = msg.content[HEADER]["run_id"] if HEADER in msg.content else ""
        reply = ClientInfo(
            header=Header(
                run_id=str(run_id),
                server_round=0,
                model_fingerprint=handle.fingerprint,
                adapter_hash="",
                num_examples=len(data.examples),
                client_id=data.client_id,
            ),
            device=str(handle.device),
            properties={
                prop: float(context.node_config[k])
                for k, prop in NODE_PROPERTIES.items()
                if k in context.node_config
            },
        )
        return Message(encode_client_info(reply), reply_to=msg)

    @app.train("lora")
    def train(msg: Message, context: Context) -> Message:
        run, handle, ins = _decode(cfg, context, cache, msg)
        _check_strategy(ins.strategy, run)
        data = client_data(run, handle, partition_id(context), cache, own_data(context))
        trainer = make_trainer(ins.train.trainer, resolve(run.strategy.name))
        if getattr(trainer, "stateful", False):  # keeps per-node state in Context.state
            stateful: Any = trainer  # fit(handle, ins, data, node=...)
            node = NodeState(context, ins.header.run_id, ins.header.server_round)
            update = stateful.fit(handle, ins, data, node=node)
        else:
            update = trainer.fit(handle, ins, data)
        if ins.secure:
            kept = keep_lora(context, update, ins)
            return Message(encode_update(kept), reply_to=msg)
        if not (ins.up_codec.sparse and ins.compress.error_feedback):
            return Message(encode_update(update, ins), reply_to=msg)
        feedback = load_feedback(context, ins.header.run_id)
        content = encode_update(update, ins, feedback)
        save_feedback(context, ins.header.run_id, feedback)
        return Message(content, reply_to=msg)

    @app.train("zo")
    def train_zo(msg: Message, context: Context) -> Message:
        run = _config(cfg, context, cache)
        ins = decode_zo_instruction(msg.content)
        handle = base_model(run, cache, ins.spec)
        _check_fingerprint(ins.header.model_fingerprint, handle)
        _check_strategy(ins.strategy, run)
        data = client_data(run, handle, partition_id(context), cache, own_data(context))
        trainer = zo_trainer_of(resolve(run.strategy.name))
        update = trainer.fit(handle, ins, data, cache)
        if ins.secure:
            blocks = get_runtime(handle, ins.spec, cache, trainer.mask).num_blocks
            update = keep_zo(context, update, ins, blocks)
        return Message(encode_zo_update(update), reply_to=msg)

    app.query("secagg")(secagg_query())

    @app.query("refused")
    def refused(msg: Message, context: Context) -> Message:
        run_id, reason = decode_refusal(msg.content)
        log.warning(
            "fedpeft: the coordinator of run %s left this node (partition-id %s) out: %s",
            run_id, context.node_config.get("partition-id"), reason,
        )  # fmt: skip
        return Message(RecordDict(), reply_to=msg)

    @app.evaluate("lora")
    def evaluate(msg: Message, context: Context) -> Message:
        run, handle, ins = _decode(cfg, context, cache, msg)
        evalset = client_evalset(run, handle, partition_id(context), cache, own_data(context))
        adapter = ins.adapter
        if ins.options.get(PERSONAL):  # this node's own model: the global plus its own part
            trainer = make_trainer("lora", resolve(run.strategy.name))
            own = getattr(trainer, "own_adapter", None)
            if own is not None:
                # the model after round r is what round r + 1 would read
                after = ins.header.server_round + 1
                adapter = own(adapter, NodeState(context, ins.header.run_id, after))
        metrics = Evaluator(run, handle, evalset)(ins.lora, adapter, ins.with_metric)
        header = Header(
            run_id=ins.header.run_id,
            server_round=ins.header.server_round,
            model_fingerprint=handle.fingerprint,
            adapter_hash=ins.lora.config_hash(),
            num_examples=len(evalset.examples),
            client_id=str(partition_id(context)),
        )
        return Message(encode_eval_report(EvalReport(header=header, metrics=metrics)), reply_to=msg)

    return app
