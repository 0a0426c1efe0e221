"""Find and build strategies: the registry, plus out-of-tree loading.

``strategy.name`` may be

- a name registered in this process (:func:`register_strategy`),
- the name of an entry point in the ``fedpeft.strategies`` group of an installed package: the
  in-tree strategies are declared there too, in fedpeft's ``pyproject.toml``, so this module
  never imports the strategies package (no import cycle),
- ``path/to/file.py:ClassName`` (relative to the working directory), or
- ``package.module:ClassName`` (importable dotted path).

A strategy class has a ``Config`` dataclass of options, a ``capabilities`` attribute
(:class:`~fedpeft.algorithms.capabilities.Capabilities`, or a function of the options returning
one), optionally its client half as ``trainer`` (an object with ``fit(handle, ins, data)``),
and is built as ``Cls(config, ctx)``. Registering a name twice, or a class without that shape,
fails loudly.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
from collections.abc import Mapping
from typing import Any

from fedpeft.algorithms.base import Strategy, StrategyContext
from fedpeft.algorithms.capabilities import Capabilities, capabilities_of
from fedpeft.config.build import build_dataclass
from fedpeft.errors import StrategyError
from fedpeft.plugins import load_object

__all__ = [
    "build_strategy",
    "check_strategy_config",
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
    trainer = getattr(cls, "trainer", None)
    if trainer is not None and not callable(getattr(trainer, "fit", None)):
        raise StrategyError(
            f"{where}: {cls.__name__}.trainer (its client half) needs a fit(handle, ins, data) "
            f"method; got {trainer!r}"
        )
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


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def registered() -> list[str]:
    """Names of the registered strategies: in-tree and installed ones (entry points, as
    ``pyproject.toml`` declares fedpeft's own) and those registered in this process."""
    return sorted(set(_REGISTRY) | {ep.name for ep in _entry_points()})


def resolve(name: str) -> type[Any]:
    """The strategy class that ``name`` refers to (see the module docstring).

    Raises
    ------
    StrategyError
        Naming the registered strategies when nothing matches.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        cls = load_object(name, "strategy")
    else:
        eps = _entry_points(name)
        if not eps:
            raise StrategyError(
                f"unknown strategy {name!r}; registered: {', '.join(registered())}; or give "
                "'path/to/file.py:Class' or 'package.module:Class'"
            )
        if len({ep.value for ep in eps}) > 1:
            where = ", ".join(sorted({ep.value for ep in eps}))
            raise StrategyError(f"strategy {name!r} is declared by several packages: {where}")
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
