"""Kill a coordinator process (and its pool) once it has got far enough."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def kill_when(
    script: str, args: list[str], ready: Callable[[], bool], log_path: Path, timeout: float = 600
) -> None:
    """Run ``python -c script *args`` and SIGKILL it, with its process group, once ``ready()``.

    Its own process group: the kill takes its pool (forkserver, workers) with it, as the loss
    of its machine would, instead of leaving them orphaned. Fails if the script ends first, or
    if ``ready()`` is still false after ``timeout`` seconds (a generous deadline, not a timing
    expectation: the coordinator is killed either way).
    """
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            reached = False
            while time.monotonic() < deadline and proc.poll() is None:
                if ready():
                    reached = True
                    break
                time.sleep(0.05)
            log.seek(0)
            assert proc.poll() is None, f"the coordinator ended before it was killed:\n{log.read()}"
            assert reached, f"not ready after {timeout} s; the coordinator's log:\n{log.read()}"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
