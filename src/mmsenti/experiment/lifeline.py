"""Run a command that ends with the process that started it: ``python -I -S lifeline.py PARENT_PID CMD [ARG...]``.

`mmsenti experiment run` starts every run through this file, so that killing the runner (``kill -9`` included)
ends its runs instead of leaving them training as orphans that keep their run directories locked (a rerun would
report those rows "in use").

* Linux: the kernel ends it. ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` asks for SIGTERM when the thread that started
  this process ends (the runner's lane thread, which waits for the run, so: when the runner ends), then the
  command replaces this process (``exec``; the setting survives it). SIGTERM stops a training run as ``kill``
  does: the lock goes with the process and checkpoints are written atomically, so a rerun resumes the run.
* Elsewhere: this process stays between the two, checks its parent every second and stops the command
  (SIGTERM) when the parent is gone; a SIGTERM it receives is passed on.

If the parent ended before the tie was made (this process already has another parent), nothing is run. The file
uses the standard library only and is run by path in isolated mode: it starts in milliseconds and imports nothing
of mmsenti.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0
ORPHANED = 143  # the exit code of a process ended by SIGTERM (128 + 15)


def tie_to_parent() -> bool:
    """Linux: ask the kernel for SIGTERM when the parent ends; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch(parent: int, cmd: list[str]) -> int:
    """Run ``cmd`` as a child; stop it when ``parent`` is no longer this process's parent. Returns its exit code."""
    child = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # the runner stops its runs with SIGTERM
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                child.terminate()


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    tied = tie_to_parent()
    if os.getppid() != parent:  # the parent ended before the tie: it no longer wants this run
        return ORPHANED
    if tied:
        os.execv(cmd[0], cmd)
    return watch(parent, cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
