"""``python -m fedpeft.deploy.guard PARENT_PID CMD...``: run CMD, and let the kernel send it
SIGTERM when the process PARENT_PID dies.

Linux's ``prctl(PR_SET_PDEATHSIG)`` survives ``exec``, so the command itself (a SuperLink, a
SuperNode, a ``fedpeft link``) is stopped cleanly when whoever started it is killed, even with
SIGKILL, and stops its own children in turn. If the parent is already gone when the guard
starts, the command is not run. Elsewhere than Linux the command runs without the guarantee.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: Sequence[str]) -> int:
    """Set the parent-death signal, check the parent still lives, ``exec`` the command."""
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m fedpeft.deploy.guard PARENT_PID CMD...", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), list(argv[1:])
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            print(f"fedpeft guard: prctl failed: {os.strerror(err)}", file=sys.stderr)
            return 1
        if os.getppid() != parent:  # it died before the signal was armed
            return 1
    os.execvp(cmd[0], cmd)
    return 1  # pragma: no cover (exec does not return)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
