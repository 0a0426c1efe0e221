"""Build a config dataclass from a TOML mapping, collecting every problem (a leaf module)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

from fedpeft.errors import ConfigError

__all__ = ["build_dataclass"]


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
