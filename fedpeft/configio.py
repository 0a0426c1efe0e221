"""Read, override, validate and write run configurations.

``load_config(path, ["rounds=2", "lora.rank=4"])`` reads a scenario TOML, applies dotted
``key=value`` overrides (values parsed as TOML, falling back to a plain string), checks every
key and value, and raises one :class:`~fedpeft.errors.ConfigError` listing all problems. An
unknown key names the valid keys of its section. Top-level shortcuts (``rounds``,
``num_clients``, ``seed``) expand to their ``federation.*`` keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError

__all__ = [
    "build_dataclass",
    "config_hash",
    "config_to_dict",
    "dump_toml",
    "load_config",
    "parse_overrides",
]

SHORTCUTS = {
    "rounds": "federation.rounds",
    "num_clients": "federation.num_clients",
    "seed": "federation.seed",
}
PATH_FIELDS = ("data.path", "devices.file")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a.b": 1, "c": "x"}``.

    Parameters
    ----------
    items : Sequence[str]
        ``KEY=VALUE`` strings; VALUE is read as TOML (``4``, ``1e-3``, ``true``,
        ``["q_proj"]``, ``"text"``) and taken as a plain string if that fails.

    Returns
    -------
    dict[str, Any]
        Dotted key to parsed value.
    """
    problems: list[str] = []
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r} is not KEY=VALUE (for example rounds=2)")
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[SHORTCUTS.get(key, key)] = value
    if problems:
        raise ConfigError(problems)
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against a field annotation; return (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `lora.target_modules=q_proj` on the command line
            value = [value]
        if not isinstance(value, list):
            return False, value
        coerced = []
        for v in value:
            ok, cv = _type_ok(v, item_tp)
            if not ok:
                return False, value
            coerced.append(cv)
        return True, coerced
    if origin is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_dataclass(
    cls: type[Any], data: Mapping[str, Any], prefix: str, problems: list[str]
) -> Any:
    """Build dataclass ``cls`` from a mapping, appending every problem to ``problems``.

    Unknown keys name the valid ones, values are type-checked against the annotations and
    the class's own ``__post_init__`` checks run; on any problem the defaults are returned
    so that checking can go on and report everything at once.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            where = f"[{prefix}]" if prefix else "the top level"
            hint = difflib.get_close_matches(key, list(fields), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                f"unknown key {(prefix + '.' if prefix else '') + key!r}{did}; "
                f"valid keys at {where}: {', '.join(sorted(fields))}"
            )
            continue
        tp = hints[key]
        name = f"{prefix}.{key}" if prefix else key
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{name} must be a table [{name}], got {value!r}")
                continue
            kwargs[key] = build_dataclass(tp, value, name, problems)  # type: ignore[arg-type]
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            problems.append(f"{name} must be {_type_name(tp)}, got {value!r}")
            continue
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems.extend(err.problems)
        return cls()


def _resolve_paths(tree: dict[str, Any], base: Path, overridden: set[str]) -> None:
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        value = tree.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            root = Path.cwd() if dotted in overridden else base
            tree[section][key] = str((root / value).resolve())


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    text: str | None = None,
) -> RunConfig:
    """Load a scenario TOML (or the defaults), apply overrides and validate everything.

    Parameters
    ----------
    path : str | Path | None
        The scenario TOML; ``None`` starts from the defaults (relative paths are then
        relative to the working directory).
    overrides : Sequence[str] | Mapping[str, Any]
        ``KEY=VALUE`` strings or an already parsed dotted-key mapping.
    text : str | None
        The scenario as TOML text instead of a file (``path`` must then be ``None``;
        relative paths in it are relative to the working directory). A deployed run
        carries its scenario this way, inside Flower's run config.

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        Listing every problem found: unreadable file, unknown keys (with the valid ones),
        wrong types, out-of-range values, unknown strategy or bad strategy options.
    """
    problems: list[str] = []
    tree: dict[str, Any] = {}
    base = Path.cwd()
    if text is not None:
        if path is not None:
            raise ConfigError("give the scenario as a path or as text, not both")
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"the scenario text is not valid TOML: {err}") from None
    elif path is not None:
        p = Path(path)
        base = p.resolve().parent
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
    parsed = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    for key, value in parsed.items():
        _set_dotted(tree, key, value)
    _resolve_paths(tree, base, set(parsed))
    cfg: RunConfig = build_dataclass(RunConfig, tree, "", problems)
    from fedpeft.strategies.registry import check_strategy_config, resolve

    strategy_problems = check_strategy_config(cfg.strategy.name, cfg.strategy.options)
    problems.extend(strategy_problems)
    zo = not strategy_problems and getattr(resolve(cfg.strategy.name), "mode", "lora") == "zo"
    if zo and cfg.eval.federated:
        problems.append(
            f"eval.federated is for LoRA strategies; {cfg.strategy.name!r} is a seed/scalar "
            "strategy: set eval.federated=false"
        )
    if not problems:
        problems += _cross_section_problems(cfg, zo)
    if problems:
        raise ConfigError(problems)
    return cfg


SECAGG_STRATEGIES = ("fedavg", "ffa", "fedkseed", "ferret")


def _cross_section_problems(cfg: RunConfig, zo: bool) -> list[str]:
    """Combinations of sections that cannot work together."""
    p = []
    if cfg.dp.active and cfg.robust.active:
        p.append(
            "dp clips and averages every update itself; robust.rule must be 'mean' with no "
            "clipping when dp.noise_multiplier > 0"
        )
    if cfg.dp.active and cfg.strategy.name == "fedkseed-pro":
        p.append(
            "fedkseed-pro samples seeds from non-private client statistics; use fedkseed with dp"
        )
    if cfg.robust.scalar_clip > 0 and not zo:
        p.append("robust.scalar_clip is for seed/scalar strategies; LoRA uses robust.clip_norm")
    if zo and cfg.robust.rule in ("median", "krum", "multikrum"):
        p.append(
            f"robust.rule = {cfg.robust.rule!r} combines LoRA updates; seed/scalar strategies "
            "take 'mean' or 'trimmed_mean' (per seed)"
        )
    if cfg.secagg.enabled:
        if cfg.strategy.name not in SECAGG_STRATEGIES:
            p.append(
                f"secagg works with strategies {SECAGG_STRATEGIES} (one shape for all clients, "
                f"a plain sum), not {cfg.strategy.name!r}"
            )
        if cfg.robust.active:
            p.append("robust rules need individual updates; they cannot run with secagg")
        if cfg.compress.up != "none":
            p.append("secagg sends fixed-point vectors; set compress.up = none")
        if cfg.ranks.mode != "uniform":
            p.append("secagg sums one shape for all clients; set ranks.mode = uniform")
    if cfg.dp.active and cfg.federation.centralized:
        p.append("dp protects clients; it has no meaning in centralized mode")
    return p


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (lists and dicts copied)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: RunConfig) -> str:
    """A stable 16-hex-digit blake2b digest of the whole configuration."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as TOML")


def dump_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Write a nested mapping of plain values as TOML (tables after scalars).

    Parameters
    ----------
    data : Mapping[str, Any]
        Strings, numbers, booleans, lists of those, and nested mappings.
    _prefix : str
        Table name of ``data`` (internal, for recursion).

    Returns
    -------
    str
        TOML text that ``tomllib`` reads back to ``data``.
    """
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{_prefix}.{key}" if _prefix else key
            body = dump_toml(value, name)
            tables.append(f"[{name}]\n{body}" if body.strip() or not value else body)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for t in tables:
        out += ("\n" if out else "") + t
    return out
