"""Child processes of the deployment roles: Flower's own commands, started and stopped cleanly.

Flower's SuperLink and SuperNode each start a SuperExec child, which starts a process per
task. Every child here gets its own process group, so stopping it stops its whole tree.

A child started with ``die_with_parent`` is sent SIGTERM by the kernel when the process that
started it dies, however it dies (SIGKILL included): it is run through
:mod:`fedpeft.deploy.guard`, which sets Linux's parent-death signal and then execs the
command (a ``preexec_fn`` would do the same, but is unsafe in a process with threads). On
other systems the child is started the same way without that guarantee.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from fedpeft.errors import FedpeftError

__all__ = ["flower_command", "flower_env", "start", "stop", "wait_port"]


def flower_command(name: str) -> str:
    """Path of a Flower command (``flower-superlink``, ``flwr``...) next to this Python first."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FedpeftError(
            f"{name} is not installed (it comes with flwr; pip install 'flwr==1.41.*')"
        )
    return found


def flower_env(
    flwr_home: Path | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This environment, with this Python's scripts first on PATH and no telemetry."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def start(
    cmd: Sequence[str],
    env: Mapping[str, str],
    log: IO[bytes] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group (output to ``log``, or inherited); with
    ``die_with_parent`` it gets SIGTERM when this process dies (Linux)."""
    if die_with_parent:
        guard = [sys.executable, "-m", "fedpeft.deploy.guard", str(os.getpid())]
        cmd = [*guard, *cmd]
    return subprocess.Popen(
        list(cmd),
        env=dict(env),
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):  # children left in the group (SuperExec...)
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def wait_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts TCP connections; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            what = Path(str(list(proc.args)[0])).name  # type: ignore[arg-type]
            raise FedpeftError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FedpeftError(f"nothing listens on {host}:{port} after {timeout_s:g} s")
