"""Find and build strategies: the registry, plus out-of-tree loading.

``strategy.name`` may be

- a registered name (``fedavg``; in-tree strategies register beside their definition),
- ``path/to/file.py:ClassName`` (relative to the working directory),
- ``package.module:ClassName`` (importable dotted path), or
- the name of an entry point in the ``fedpeft.strategies`` group of an installed package.

A strategy class has a ``Config`` dataclass of options, a ``capabilities`` attribute
(:class:`~fedpeft.algorithms.capabilities.Capabilities`, or a function of the options returning
one) and is built as ``Cls(config, ctx)``. Registering a name twice, or a class without that
shape, fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.algorithms.capabilities import Capabilities, capabilities_of
from fedpeft.config.build import build_dataclass
from fedpeft.errors import StrategyError
from fedpeft.strategies.base import Strategy, StrategyContext

__all__ = [
    "build_strategy",
    "check_strategy_config",
    "load_object",
    "register_strategy",
    "registered",
    "resolve",
    "strategy_capabilities",
]

ENTRY_POINT_GROUP = "fedpeft.strategies"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_REGISTRY: dict[str, type[Any]] = {}


def _check_shape(cls: type[Any], where: str) -> None:
    if not inspect.isclass(cls):
        raise StrategyError(f"{where}: expected a strategy class, got {cls!r}")
    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise StrategyError(
            f"{where}: {cls.__name__} needs a `Config` dataclass of its options "
            "(an empty `@dataclass class Config: pass` if it has none)"
        )
    missing = [
        m
        for m in ("configure_train", "aggregate_train", "state_dict", "load_state_dict")
        if not callable(getattr(cls, m, None))
    ]
    if missing:
        raise StrategyError(f"{where}: {cls.__name__} lacks the Strategy methods {missing}")
    caps = getattr(cls, "capabilities", None)
    if not isinstance(caps, Capabilities) and not callable(caps):
        raise StrategyError(
            f"{where}: {cls.__name__} needs `capabilities = Capabilities(...)` "
            "(fedpeft.algorithms.capabilities): its update family and what it combines with"
        )


def register_strategy(name: str, cls: type[Any]) -> None:
    """Register a strategy class under ``name``.

    Raises
    ------
    StrategyError
        If the name is malformed or taken, or the class lacks ``Config`` or a method.
    """
    if not _NAME.match(name):
        raise StrategyError(f"strategy name {name!r} must match {_NAME.pattern}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        owner = _REGISTRY[name]
        raise StrategyError(
            f"strategy {name!r} is already registered by {owner.__module__}.{owner.__qualname__}; "
            "choose another name"
        )
    _check_shape(cls, f"register_strategy({name!r})")
    _REGISTRY[name] = cls


def registered() -> list[str]:
    """Names of the registered strategies."""
    import fedpeft.strategies  # noqa: F401  (in-tree strategies register on import)

    return sorted(_REGISTRY)


def _load_file(path: Path, attr: str) -> Any:
    if not path.is_file():
        raise StrategyError(f"strategy file {str(path)!r} does not exist")
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    mod_name = f"fedpeft_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise StrategyError(f"cannot import {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[mod_name]
            raise StrategyError(f"importing {str(path)!r} failed: {err!r}") from err
    return _attr(sys.modules[mod_name], attr, str(path))


def _attr(module: Any, attr: str, where: str) -> Any:
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise StrategyError(f"{where} has no {attr!r}; it defines {names}")
    return getattr(module, attr)


def load_object(ref: str, what: str) -> Any:
    """The object named by ``'path/to/file.py:Name'`` or ``'package.module:Name'``.

    Raises
    ------
    StrategyError
        If the file or module cannot be imported or lacks the name.
    """
    path, sep, attr = ref.rpartition(":")
    if not sep or not path or not attr:
        raise StrategyError(
            f"{what} {ref!r} must be 'path/to/file.py:Name' or 'package.module:Name'"
        )
    if path.endswith(".py") or "/" in path:
        return _load_file(Path(path), attr)
    try:
        return _attr(importlib.import_module(path), attr, path)
    except ImportError as err:
        raise StrategyError(f"cannot import {path!r} for {what} {ref!r}: {err}") from err


def resolve(name: str) -> type[Any]:
    """The strategy class that ``name`` refers to (see the module docstring).

    Raises
    ------
    StrategyError
        Naming the registered strategies when nothing matches.
    """
    known = registered()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        cls = load_object(name, "strategy")
    else:
        eps = [
            ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name
        ]
        if not eps:
            raise StrategyError(
                f"unknown strategy {name!r}; registered: {', '.join(known)}; or give "
                "'path/to/file.py:Class' or 'package.module:Class'"
            )
        cls = eps[0].load()
    _check_shape(cls, f"strategy {name!r}")
    return cls  # type: ignore[no-any-return]


def _options(cls: type[Any], options: Mapping[str, Any], problems: list[str]) -> Any:
    return build_dataclass(cls.Config, dict(options), "strategy.options", problems)


def check_strategy_config(name: str, options: Mapping[str, Any]) -> list[str]:
    """Every problem with a strategy name and its options (empty if fine)."""
    try:
        cls = resolve(name)
    except StrategyError as err:
        return [f"strategy.name: {err}"]
    problems: list[str] = []
    _options(cls, options, problems)
    return problems


def strategy_capabilities(name: str, options: Mapping[str, Any]) -> Capabilities:
    """The capabilities of strategy ``name`` with ``options`` (``[strategy.options]``).

    Raises
    ------
    StrategyError
        If the strategy cannot be found, its options are invalid, or it declares none.
    """
    cls = resolve(name)
    problems: list[str] = []
    config = _options(cls, options, problems)
    if problems:
        raise StrategyError("; ".join(problems))
    return capabilities_of(cls, config)


def build_strategy(name: str, options: Mapping[str, Any], ctx: StrategyContext) -> Strategy:
    """Resolve ``name``, validate ``options`` against its ``Config`` and build it.

    Raises
    ------
    StrategyError
        If the strategy cannot be found or its options are invalid (all problems listed).
    """
    cls = resolve(name)
    problems: list[str] = []
    config = _options(cls, options, problems)
    if problems:
        raise StrategyError("; ".join(problems))
    strategy = cls(config, ctx)
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"strategy {name!r} built a {type(strategy).__name__} that is not a Strategy"
        )
    return strategy
