"""Read, override, validate and write run configurations.

``load_config(path, ["rounds=2", "lora.rank=4"])`` reads a scenario TOML, applies dotted
``key=value`` overrides (values parsed as TOML, falling back to a plain string), checks every
key and value, and raises one :class:`~fedpeft.errors.ConfigError` listing all problems. An
unknown key names the valid keys of its section. Top-level shortcuts (``rounds``,
``num_clients``, ``seed``) expand to their ``federation.*`` keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.algorithms.registry import check_strategy_config, strategy_capabilities
from fedpeft.config.build import build_dataclass
from fedpeft.config.rules import cross_section_problems
from fedpeft.config.sections import RunConfig
from fedpeft.errors import ConfigError

__all__ = [
    "build_dataclass",
    "combination_problems",
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
    problems.extend(check_strategy_config(cfg.strategy.name, cfg.strategy.options))
    if not problems:
        problems += combination_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def combination_problems(cfg: RunConfig) -> list[str]:
    """Every cross-section problem of a built configuration (its strategy must resolve)."""
    caps = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
    return cross_section_problems(cfg, caps)


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
