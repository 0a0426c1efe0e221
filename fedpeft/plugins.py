"""Load an object a scenario names by ``path/to/file.py:Name`` or ``package.module:Name``.

Strategies, rank policies and bandits plug in this way (a leaf module: it imports nothing of
fedpeft but its errors). A file is imported once per process under a name derived from its
resolved path, so two plug-ins with the same file name do not collide.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from fedpeft.errors import StrategyError

__all__ = ["load_object"]


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
