"""The device client: a Flower ``ClientApp`` that trains LoRA adapters on a shared base model.

Handlers (Flower routes ``<category>.<action>`` message types to them):

- ``query.info``: reply with a :class:`~fedpeft.wire.ClientInfo` (client id, example count,
  device, base-model fingerprint).
- ``train.lora``: decode a :class:`~fedpeft.wire.TrainInstruction`, train, reply with a
  :class:`~fedpeft.wire.LoraUpdate`.

The base model and the client's tokenized data come from ``fedpeft.cache.PROCESS_CACHE``: they
are built once per process and shared by every virtual client the process runs; a round only
switches adapter weights. An exception in a handler becomes an error reply (Flower's runtime
and the in-process grid both do this), which the coordinator records as that client's failure.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.client.trainer import ClientData, make_trainer
from fedpeft.config import RunConfig
from fedpeft.configio import load_config
from fedpeft.data.clients import client_records
from fedpeft.data.tasks import format_pairs
from fedpeft.data.tokenize import encode_pairs
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.lora import ModelHandle
from fedpeft.models import get_model, model_key
from fedpeft.wire import (
    HEADER,
    ClientInfo,
    Header,
    decode_instruction,
    encode_client_info,
    encode_update,
)

__all__ = ["client_data", "make_client_app", "partition_id"]


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
    cfg: RunConfig, handle: ModelHandle, pid: int, cache: ProcessCache = PROCESS_CACHE
) -> ClientData:
    """The tokenized training examples of partition ``pid`` (built once per process)."""

    def build() -> ClientData:
        pairs = format_pairs(client_records(cfg, pid, cache), cfg.data)
        examples = encode_pairs(
            handle.tokenizer, pairs, cfg.train.max_seq_len, cfg.data.chat_template
        )
        return ClientData(client_id=str(pid), examples=examples)

    key = "client-data:" + json.dumps(
        [
            asdict(cfg.data),
            asdict(cfg.federation),
            cfg.train.max_seq_len,
            model_key(cfg.model),
            pid,
        ],
        sort_keys=True,
    )
    return cache.get(key, build)


def _config(fixed: RunConfig | None, context: Context, cache: ProcessCache) -> RunConfig:
    if fixed is not None:
        return fixed
    path = context.run_config.get("config")
    if not isinstance(path, str):
        raise ConfigError("the run config has no 'config' (path of the scenario TOML)")
    overrides = str(context.run_config.get("overrides", ""))
    return cache.get(f"config:{path}:{overrides}", lambda: load_config(path, overrides.split()))


def make_client_app(cfg: RunConfig | None = None, cache: ProcessCache = PROCESS_CACHE) -> ClientApp:
    """Build the fedpeft ``ClientApp``.

    Parameters
    ----------
    cfg : RunConfig | None
        The scenario; ``None`` reads the TOML path from the run config key ``config``
        (with optional ``overrides``), as ``flwr run`` passes it.
    cache : ProcessCache
        Where the base model and data live (the process cache by default).

    Returns
    -------
    ClientApp
        With ``query.info`` and ``train.lora`` handlers.
    """
    app = ClientApp()

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        run = _config(cfg, context, cache)
        handle = get_model(run.model, cache)
        pid = partition_id(context)
        data = client_data(run, handle, pid, cache)
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
        )
        return Message(encode_client_info(reply), reply_to=msg)

    @app.train("lora")
    def train(msg: Message, context: Context) -> Message:
        run = _config(cfg, context, cache)
        handle = get_model(run.model, cache)
        ins = decode_instruction(msg.content)
        if ins.header.model_fingerprint != handle.fingerprint:
            raise ProtocolError(
                f"the coordinator trains base model {ins.header.model_fingerprint}, this node has "
                f"{handle.fingerprint} ({handle.name}); load the same model on both sides"
            )
        data = client_data(run, handle, partition_id(context), cache)
        update = make_trainer(ins.train.trainer).fit(handle, ins, data)
        return Message(encode_update(update), reply_to=msg)

    return app
