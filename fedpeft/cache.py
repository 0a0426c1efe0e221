"""Objects shared by all virtual clients of one process: base models, tasks, partitions.

A process is the unit of sharing: the in-process simulation runs every virtual client in one
process, Ray runs many per actor process, and a deployed node runs one. Hence one cache per
process, ``PROCESS_CACHE``, the single deliberate module-level object in fedpeft. Everything
else receives its state explicitly.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["PROCESS_CACHE", "ProcessCache"]

T = TypeVar("T")


class ProcessCache:
    """Build-once values by key, with a count of how often each key was built."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._lock = threading.RLock()
        self.builds: Counter[str] = Counter()

    def get(self, key: str, factory: Callable[[], T]) -> T:
        """The value for ``key``, calling ``factory`` the first time only."""
        with self._lock:
            if key not in self._items:
                self._items[key] = factory()
                self.builds[key] += 1
            return self._items[key]  # type: ignore[no-any-return]

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        """The cached ``(key, value)`` pairs whose key starts with ``prefix``."""
        with self._lock:
            return [(k, v) for k, v in self._items.items() if k.startswith(prefix)]

    def discard(self, keys: Callable[[str, Any], bool]) -> int:
        """Drop every entry for which ``keys(key, value)`` is true; returns how many."""
        with self._lock:
            gone = [k for k, v in self._items.items() if keys(k, v)]
            for k in gone:
                del self._items[k]
            return len(gone)

    def count(self, prefix: str) -> int:
        """How many builds happened for keys starting with ``prefix``."""
        return sum(n for k, n in self.builds.items() if k.startswith(prefix))

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        """A cache sent to another process (Ray pickles the ClientApp) becomes that process's.

        Cached models and data never travel: each process builds its own, once.
        """
        return (_process_cache, ())

    def clear(self) -> None:
        """Drop every value and count (tests)."""
        with self._lock:
            self._items.clear()
            self.builds.clear()


PROCESS_CACHE = ProcessCache()


def _process_cache() -> ProcessCache:
    return PROCESS_CACHE
