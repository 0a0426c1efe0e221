"""The ``fedpeft`` command line: one verb per job, ``--config X.toml`` and ``KEY=VALUE`` overrides.

Verbs:

- ``fedpeft simulate --config X.toml --out DIR [--backend inprocess|ray] [--quiet] [KEY=VALUE ...]``
- ``fedpeft simulate --resume DIR``: continue a run from its checkpoint (its last complete
  round), with the run folder's own ``config.toml``.
- ``fedpeft validate --config X.toml [KEY=VALUE ...]``: check a scenario and its data (read,
  no model loaded), print it resolved.
- ``fedpeft generate DIR "PROMPT" [...] [--max-new-tokens N] [--raw]``: a finished run's
  answers, its base and adapter loaded exactly as the run loaded them.
- ``fedpeft rules``: which sections combine, as markdown (``docs/combinations.md``).
- ``fedpeft report DIR [DIR ...] --out REPORT [--reference DIR]``: plots and a side-by-side
  table (Markdown and HTML) of run folders; seeds of one scenario as mean ± spread.
- ``fedpeft config-help``: every configuration key with its default and help text.
- ``fedpeft strategies``: the registered strategies.
- ``fedpeft data inspect --config X.toml [KEY=VALUE ...] [--json]``: each client's record
  counts, key mix and skew (no model loaded).
- ``fedpeft data wordnet --src DIR --out FILE``: rebuild the WordNet task file.
- ``fedpeft keys --out DIR [--host H ...] [--nodes N | --add NAME ...]``: CA, coordinator
  certificate, operator app-signing key, one folder per node.
- ``fedpeft link --keys DIR [--host H] [--port P]``: the coordinator's long-lived half: a
  SuperLink on 127.0.0.1 behind a mutual-TLS, Fleet-only front.
- ``fedpeft server --config X.toml --out DIR --keys DIR [--host H] [--port P]``: one deployed
  run (link started, node keys registered, the app signed and submitted, results written).
- ``fedpeft client --superlink H:P --creds nodes/NAME [--partition-id I ...]``: edge node
  (SuperNode, the long-lived model worker and the mutual-TLS tunnel; restarts by itself).

Exit codes: 0 success, 2 configuration or usage error, 1 any other fedpeft error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.config.sections import QUANTIZATION_LABELS
from fedpeft.errors import ConfigError, FedpeftError

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="scenario TOML (see simulations/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. rounds=2 lora.rank=4",
    )


def _add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", required=True, help="the folder `fedpeft keys` wrote")
    p.add_argument("--host", default="127.0.0.1", help="address nodes connect to (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=9092, help="port nodes connect to (the front)")
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="the SuperLink's port on 127.0.0.1 (default: --port + 1)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft", description="Federated fine-tuning with LoRA on Flower."
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    sim = sub.add_parser("simulate", help="run a scenario with simulated clients")
    _add_config_args(sim, required=False)
    sim.add_argument(
        "--out", default=None, help="run folder for metrics.jsonl, summary.json, adapter/"
    )
    sim.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its checkpoint (uses DIR/config.toml)",
    )
    sim.add_argument(
        "--backend", choices=("inprocess", "ray"), default=None, help="override simulation.backend"
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar or final table")
    sim.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log every round's metrics as TensorBoard scalars in OUT/tensorboard",
    )
    rep = sub.add_parser("report", help="plots and a comparison table of finished runs")
    rep.add_argument("runs", nargs="+", metavar="DIR", help="run folders (metrics.jsonl)")
    rep.add_argument("--out", required=True, help="report folder (PNGs, summary.md, index.html)")
    rep.add_argument("--reference", default=None, help="a centralized run to draw as a line")
    exp = sub.add_parser(
        "export-device",
        help="write a device's deployed model (pruning runs) for transformers + peft",
    )
    exp.add_argument("run", metavar="DIR", help="a finished fedspine run folder")
    exp.add_argument("--client", required=True, help="the device's client id")
    exp.add_argument("--out", required=True, help="folder for model/, adapter/, device.json")
    val = sub.add_parser("validate", help="check a scenario and print it fully resolved")
    _add_config_args(val)
    gen = sub.add_parser(
        "generate", help="answer prompts with a finished run's model (base + adapter, as run)"
    )
    gen.add_argument("run", metavar="DIR", help="a run folder (fedpeft simulate --out)")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to answer")
    gen.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens"
    )
    gen.add_argument(
        "--raw", action="store_true", help="send the text as is, not in data.prompt_template"
    )
    gen.add_argument("--device", default=None, help="cpu | cuda | ... (default: the run's)")
    sub.add_parser("config-help", help="list every configuration key with default and help")
    sub.add_parser("strategies", help="list the registered strategies")
    sub.add_parser("rules", help="print which sections combine (docs/combinations.md)")
    data = sub.add_parser("data", help="inspect a scenario's split; build shipped datasets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    ins = data_sub.add_parser(
        "inspect", help="per-client record counts, key mix and skew of a scenario's split"
    )
    _add_config_args(ins)
    ins.add_argument("--json", action="store_true", help="print split.json's content instead")
    wn = data_sub.add_parser("wordnet", help="build the WordNet definition task")
    wn.add_argument(
        "--src", default="/usr/share/wordnet", help="WordNet dict folder (data.noun, ...)"
    )
    wn.add_argument("--out", default="simulations/data/wordnet.jsonl.gz", help="output .jsonl.gz")
    keys = sub.add_parser(
        "keys",
        help="create a CA, the coordinator's TLS certificate, the operator's app-signing key "
        "and one credentials folder per node",
    )
    keys.add_argument("--out", required=True, help="folder for ca.crt, server.pem, nodes/...")
    keys.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name or IP the SuperLink is reached by (repeat; 127.0.0.1 and localhost are "
        "always added)",
    )
    keys.add_argument("--nodes", type=int, default=2, help="node folders: node0, node1, ...")
    keys.add_argument(
        "--add",
        action="append",
        default=None,
        metavar="NAME",
        help="add a node folder to existing credentials (repeat); nothing else is touched",
    )
    keys.add_argument("--days", type=int, default=365, help="certificate validity in days")
    keys.add_argument("--force", action="store_true", help="replace existing credential files")
    link = sub.add_parser(
        "link",
        help="coordinator service: a SuperLink on 127.0.0.1 behind a mutual-TLS front that "
        "serves nodes the Fleet API only",
    )
    _add_link_args(link)
    link.add_argument("--state", default="fedpeft-link", help="superlink.log and flwr/ go here")
    link.add_argument(
        "--database", default=None, help="SuperLink database file (survives restarts)"
    )
    link.add_argument(
        "--max-request-mb", type=float, default=64.0, help="largest request the front forwards"
    )
    srv = sub.add_parser(
        "server", help="coordinator: run a scenario on real nodes (link, keys, signed app)"
    )
    _add_config_args(srv)
    srv.add_argument("--out", required=True, help="run folder (results, app/, link.log)")
    _add_link_args(srv)
    srv.add_argument("--keep", action="store_true", help="leave the link running afterwards")
    srv.add_argument(
        "--attach",
        action="store_true",
        help="submit to the link already running on this machine (--port, --control-port): "
        "no start, no key registration, no stop",
    )
    srv.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same --config and overrides)",
    )
    cli = sub.add_parser(
        "client",
        help="edge node: a SuperNode (node auth, signed apps only) behind a mutual-TLS tunnel, "
        "plus the model worker; reconnects by itself",
    )
    cli.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    cli.add_argument(
        "--creds", required=True, help="this node's folder from `fedpeft keys` (nodes/NAME)"
    )
    cli.add_argument("--state-dir", default="fedpeft-node", help="worker socket and node files")
    cli.add_argument("--runtime-port", type=int, default=9094, help="SuperNode's local API port")
    cli.add_argument("--partition-id", type=int, default=None, help="this node's data share")
    cli.add_argument("--num-partitions", type=int, default=None, help="shares in total")
    cli.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps")
    cli.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto")
    cli.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATION_LABELS,
        help="load this node's base model quantized (bitsandbytes; -dq: double quantization); "
        "the coordinator admits it if model.quantization or model.node_quantizations names it",
    )
    cli.add_argument("--data-path", default=None, help="this node's copy of the data file")
    cli.add_argument(
        "--own-data",
        action="store_true",
        help="the data file is this node's own: train on all of it, not a partition",
    )
    cli.add_argument("--max-rank", type=int, default=None, help="largest LoRA rank to accept")
    cli.add_argument("--memory-mb", type=int, default=None, help="memory to advertise (MiB)")
    cli.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser


def _config_help() -> str:
    from fedpeft.config import RunConfig

    lines = []
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            lines.append(f"{f.name} = {f.default!r}\n    {f.metadata.get('help', '')}")
            continue
        doc = (tp.__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1]
        lines.append(f"\n[{f.name}]  {doc}")
        for sf in dataclasses.fields(tp):
            factory: Any = sf.default_factory
            default = sf.default if sf.default is not dataclasses.MISSING else factory()
            lines.append(f"{f.name}.{sf.name} = {default!r}\n    {sf.metadata.get('help', '')}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.verb == "config-help":
        print(_config_help())
        return 0
    if args.verb == "rules":
        from fedpeft.config.rules import combinations_markdown

        print(combinations_markdown(), end="")
        return 0
    if args.verb == "strategies":
        from fedpeft.algorithms.registry import registered, resolve

        for name in registered():
            doc = (resolve(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:12} {doc}")
        return 0
    if args.verb == "data" and args.dataset == "inspect":
        import json

        from fedpeft.config.load import load_config
        from fedpeft.data.check import check_data
        from fedpeft.data.inspect import format_split, inspect_split

        cfg = load_config(args.config, args.overrides)
        check_data(cfg)
        split = inspect_split(cfg)
        print(json.dumps(split, indent=1) if args.json else format_split(split))
        return 0
    if args.verb == "data":
        from fedpeft.data.wordnet import build_wordnet

        n = build_wordnet(args.src, args.out)
        print(f"wrote {n} records to {args.out}")
        return 0
    if args.verb == "keys":
        return _keys(args)
    if args.verb == "generate":
        from fedpeft.trained import load_trained

        trained = load_trained(args.run, device=args.device)
        answers = trained.generate(args.prompts, args.max_new_tokens, args.raw)
        for prompt, answer in zip(args.prompts, answers, strict=True):
            print(f"> {prompt}\n{answer}\n")
        return 0
    if args.verb == "client":
        return _client(args)
    if args.verb == "report":
        from fedpeft.report import write_report

        files = write_report(args.runs, args.out, args.reference)
        print((Path(args.out) / "summary.md").read_text(encoding="utf-8"), end="")
        print(f"wrote {len(files)} files to {args.out} (open index.html)")
        return 0
    if args.verb == "export-device":
        from fedpeft.prune.export import export_device

        out = export_device(args.run, args.client, args.out)
        import json

        info = json.loads((out / "device.json").read_text(encoding="utf-8"))
        print(
            f"wrote client {args.client}'s model to {out} ({info['params_deployed']:,} of "
            f"{info['params_base']:,} base parameters deployed; written at the base shapes "
            "with the pruned parts zeroed)"
        )
        return 0
    if args.verb == "server":
        from fedpeft.deploy.server_role import ServerRole

        role = ServerRole(
            Path(args.config), args.overrides, Path(args.out), Path(args.keys),
            args.host, args.port, args.control_port, args.keep, args.attach, args.resume,
        )  # fmt: skip
        return role.run()
    if args.verb == "link":
        from fedpeft.deploy.link import LinkRole

        if args.max_request_mb <= 0:
            raise ConfigError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
        return LinkRole(
            Path(args.keys), Path(args.state), args.host, args.port, args.control_port,
            Path(args.database) if args.database else None, int(args.max_request_mb * 2**20),
        ).run()  # fmt: skip
    from fedpeft.config.load import config_to_dict, dump_toml, load_config

    if args.verb == "validate":
        from fedpeft.data.check import check_data

        cfg = load_config(args.config, args.overrides)
        check_data(cfg)  # the records, read before any model loads
        print(dump_toml(config_to_dict(cfg)), end="")
        return 0
    from fedpeft.simulation.runner import simulate

    resume = args.resume is not None
    if resume and (args.config or args.overrides):
        raise ConfigError(
            "--resume continues with the run folder's own config.toml; drop --config and "
            "KEY=VALUE overrides (a changed scenario is a new run)"
        )
    if not resume and (args.config is None or args.out is None):
        raise ConfigError("simulate needs --config and --out (or --resume DIR)")
    out = args.resume if resume else args.out
    if resume and args.out not in (None, args.resume):
        raise ConfigError(f"--out {args.out} differs from --resume {args.resume}; give one")
    cfg = load_config(Path(out) / "config.toml" if resume else args.config, args.overrides)
    simulate(
        cfg, out, backend=args.backend, quiet=args.quiet, resume=resume,
        tensorboard=args.tensorboard,
    )  # fmt: skip
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedpeft.deploy.credentials import add_nodes, write_credentials

    if args.nodes < 0:
        raise ConfigError(f"--nodes must be >= 0, got {args.nodes}")
    if args.add:
        creds = add_nodes(args.out, args.add, args.days)
    else:
        # loopback always: the coordinator's own flwr CLI reaches the SuperLink through it
        hosts = list(dict.fromkeys([*(args.host or []), "127.0.0.1", "localhost"]))
        creds = write_credentials(
            args.out, hosts, [f"node{i}" for i in range(args.nodes)], args.days, args.force
        )
        print(f"CA certificate      {creds.ca_cert}")
        print(f"CA key              {creds.ca_key}   (signs node certificates; keep it safe)")
        print(
            f"coordinator TLS     {creds.server_cert}, {creds.server_key}   for {', '.join(hosts)}"
        )
        print(f"operator app key    {creds.operator_key}   (signs every run's app; keep it safe)")
    for name, files in creds.nodes.items():
        print(f"{name:<19} {files.folder}/   (copy this folder to the node: --creds)")
    return 0


def _client(args: argparse.Namespace) -> int:
    from fedpeft.deploy.client_role import ClientRole

    flags = {
        "partition-id": args.partition_id,
        "num-partitions": args.num_partitions,
        "device": args.device,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "data-path": str(Path(args.data_path).resolve()) if args.data_path else None,
        "own-data": 1 if args.own_data else None,
        "max-rank": args.max_rank,
        "memory-mb": args.memory_mb,
    }
    role = ClientRole(
        superlink=args.superlink,
        creds=Path(args.creds),
        state_dir=Path(args.state_dir),
        node_config={k: v for k, v in flags.items() if v is not None},
        runtime_port=args.runtime_port,
        threads=args.threads,
    )
    return role.run()


# The command is an application: it may set its own process's environment (the library never
# does). Offline model loading, no telemetry, no per-tensor bar while transformers loads weights
# (the command shows its own progress), and Ray told how to treat CUDA_VISIBLE_DEVICES for
# actors without GPUs (Ray >= 2.5x warns otherwise).
APP_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` command; returns the exit code."""
    for key, value in APP_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as err:
        print(f"fedpeft: configuration error: {err}", file=sys.stderr)
        return 2
    except FedpeftError as err:
        print(f"fedpeft: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
