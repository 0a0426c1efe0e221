"""Run a command and sample the peak resident memory of its whole process tree."""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    """Wall time, peak summed RSS of the process tree, exit code and output tail."""

    wall_s: float
    peak_rss_mib: float
    returncode: int
    tail: str


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def run_measured(cmd: list[str], interval: float = 0.1, timeout: float = 1800) -> Measured:
    """Run ``cmd``; poll every ``interval`` s for the summed RSS of it and its descendants.

    Summed RSS counts pages shared between processes once per process, so for multi-process
    runs (Ray) it is an upper bound of physical memory; for one process it is exact.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(root))
        time.sleep(interval)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    return Measured(time.perf_counter() - t0, peak / 2**20, proc.returncode, out[-3000:])
