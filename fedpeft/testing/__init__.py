"""Tools for testing with fedpeft: strategy conformance checks for plug-in authors
(:mod:`.conformance`) and test doubles for Flower's deployed runtime (:mod:`.runtime`)."""

from fedpeft.testing.conformance import ConformanceError, check_strategy
from fedpeft.testing.runtime import RecordedRuntime, free_port, http_grid_on

__all__ = ["ConformanceError", "RecordedRuntime", "check_strategy", "free_port", "http_grid_on"]
