"""Task functions for the straggler-backup tests (module-level: every engine's workers import
this module, through the PYTHONPATH that conftest.py sets)."""

import os
import re
import time


def task(arg):
    """``arg`` = ``(index, attempt, script, flags, stop_early)``.

    ``script[(index, attempt)]`` = ``(seconds, fail)`` or ``(seconds, fail, waits)``: sleep
    ``seconds`` (or, with ``waits``, until every flag in it exists, ``seconds`` being only a
    generous deadline: past it, ``TimeoutError``), then raise if ``fail``, else leave a file
    in the ``flags`` directory and return ``(index, attempt)``. Copies not in the script
    return at once. Every copy leaves ``started(index, attempt)`` when it starts and
    ``finished(...)`` when it ends, and the tests' adapter leaves ``seen(index, attempt)``
    when the loop receives a copy's result, so that scripts order copies by what happened
    instead of by how long it took. With ``stop_early``, a sleeping copy gives up (raises) as
    soon as another copy of its task has succeeded, so a loser frees its worker at once (a task
    running on an engine that cannot cancel it would otherwise keep a worker busy, and delay
    the session's exit); it raises, so it can never pass for the winner.
    """
    index, attempt, script, flags, stop_early = arg
    seconds, fail, *rest = script.get((index, attempt), (0.0, False))
    waits = rest[0] if rest else ()
    _flag(flags, started(index, attempt))
    try:
        deadline = time.monotonic() + seconds
        while waits or time.monotonic() < deadline:  # copies not in the script skip this
            if stop_early and _succeeded(flags, index):
                raise RuntimeError(f"copy {attempt} of task {index} gave up: another copy won")
            missing = [w for w in waits if not os.path.exists(os.path.join(flags, w))]
            if waits and not missing:
                break
            if waits and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"copy {attempt} of task {index} waited {seconds} s for {missing}"
                )
            time.sleep(0.02)
        if fail:
            raise OSError(f"copy {attempt} of task {index} failed")
        _flag(flags, f"{index}.{attempt}")
        return index, attempt
    finally:
        _flag(flags, finished(index, attempt))


def started(index, attempt):
    """The flag copy ``attempt`` of task ``index`` leaves when it starts."""
    return f"started-{index}-{attempt}"


def finished(index, attempt):
    """The flag it leaves when it ends, succeeded or not."""
    return f"finished-{index}-{attempt}"


def seen(index, attempt):
    """The flag the tests' adapter leaves when the loop receives that copy's result."""
    return f"seen-{index}-{attempt}"


def copy_of(result):
    """``(index, attempt)`` of the copy a result (a return value or an error) came from."""
    if isinstance(result, tuple):
        return result
    match = re.search(r"copy (\d+) of task (\d+)", str(result))
    return (int(match.group(2)), int(match.group(1))) if match else None


def _flag(flags, name):
    with open(os.path.join(flags, name), "w"):
        pass


def _succeeded(flags, index):
    return any(name.startswith(f"{index}.") for name in os.listdir(flags))


def ended(flags, index, attempt):
    """Whether copy ``attempt`` of task ``index`` has returned successfully."""
    return os.path.exists(os.path.join(flags, f"{index}.{attempt}"))
