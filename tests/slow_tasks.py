"""Task functions for the straggler-backup tests (module-level: every engine's workers import
this module, through the PYTHONPATH that conftest.py sets)."""

import os
import time


def task(arg):
    """``arg`` = ``(index, attempt, script, flags, stop_early)``.

    ``script[(index, attempt)]`` = ``(seconds, fail)``: sleep, then raise if ``fail``, else
    leave a file in the ``flags`` directory and return ``(index, attempt)``. Copies not in the
    script return at once. With ``stop_early``, a sleeping copy gives up (raises) as soon as
    another copy of its task has succeeded, so a loser frees its worker at once (a task running
    on an engine that cannot cancel it would otherwise keep a worker busy, and delay the
    session's exit); it raises, so it can never pass for the winner.
    """
    index, attempt, script, flags, stop_early = arg
    seconds, fail = script.get((index, attempt), (0.0, False))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stop_early and _succeeded(flags, index):
            raise RuntimeError(f"copy {attempt} of task {index} gave up: another copy won")
        time.sleep(0.02)
    if fail:
        raise OSError(f"copy {attempt} of task {index} failed")
    with open(os.path.join(flags, f"{index}.{attempt}"), "w"):
        pass
    return index, attempt


def _succeeded(flags, index):
    return any(name.startswith(f"{index}.") for name in os.listdir(flags))


def ended(flags, index, attempt):
    """Whether copy ``attempt`` of task ``index`` has returned successfully."""
    return os.path.exists(os.path.join(flags, f"{index}.{attempt}"))
