"""Region tasks through the run loop: ship arguments, batch, report, collect what failed.

Shared by :class:`~icechunk_distributed.RegionWriter` and
:func:`~icechunk_distributed.store_arrays` (and any later source): the caller builds one
task argument per region and merges each :class:`~icechunk_distributed.task.TaskOutput` in
``on_success``; this module pickles arguments for engines that cross processes, batches them
for engines whose calls are expensive, turns ``progress=`` into observers, and returns the
regions that failed on every attempt. The caller raises :func:`region_write_error` with what
its failure leaves behind.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from icechunk_distributed import shipping
from icechunk_distributed.errors import (
    PayloadTooLargeError,
    RegionWriteError,
    UnpicklableSourceError,
)
from icechunk_distributed.planning import Region, format_region
from icechunk_distributed.progress import Progress, ProgressEvent, ProgressObserver, observing
from icechunk_distributed.results import TaskFailure
from icechunk_distributed.runner import (
    ARG_HEADROOM,
    Backups,
    LoopFailure,
    TaskLoop,
    batch_rule,
)
from icechunk_distributed.task import TaskOutput, run_call

if TYPE_CHECKING:
    from icechunk_distributed.adapters import Adapter

__all__ = ["SUMMARY_LINES", "region_write_error", "run_region_tasks", "shipped_size"]

SUMMARY_LINES = 10
"""Failed regions listed in a :class:`RegionWriteError` message (all are in ``failures``)."""


class _Renumbered:
    """Reports the plan's region numbers instead of the loop's task numbers."""

    def __init__(self, inner: ProgressObserver, number: Sequence[int]) -> None:
        self.inner, self.number = inner, number

    def on_event(self, event: ProgressEvent) -> None:
        self.inner.on_event(dataclasses.replace(event, index=self.number[event.index]))

    def close(self) -> None:
        """Nothing: the wrapped observer is closed by its owner."""


def run_region_tasks(
    adapter: Adapter,
    fn: Callable[[Any], TaskOutput],
    regions: Sequence[Region],
    build: Callable[[int, int], Any],
    *,
    retries: int,
    progress: Progress,
    item_bytes: int,
    on_success: Callable[[int, TaskOutput, int], None],
    backups: Backups | None = None,
    indices: Sequence[int] | None = None,
    combine: bool = True,
) -> list[TaskFailure]:
    """Run ``fn(build(i, attempt))`` for every region; return the regions that failed.

    Parameters
    ----------
    adapter : Adapter
        The engine.
    fn : callable
        The task function; it returns a :class:`~icechunk_distributed.task.TaskOutput`.
    regions : sequence of dict
        One region per task.
    build : callable
        ``build(i, attempt)``: task ``i``'s argument (pickled here if the engine needs it).
    retries : int
        Extra attempts per region.
    progress : bool, callable or None
        As ``progress=`` of :func:`~icechunk_distributed.run_region_writes`.
    item_bytes : int
        One task's pickled data size, to size batches under the engine's payload limit.
    on_success : callable
        ``on_success(i, output, attempts)`` as each task succeeds (merge there).
    backups : Backups, optional
        Straggler backups.
    indices : sequence of int, optional
        The regions' numbers in the plan, for reports (default ``range(len(regions))``).
    combine : bool, default True
        Combine the forks of one engine call's tasks where they ran (one merge per call);
        False where each region's merge is counted (a chunk budget per commit).

    Returns
    -------
    list of TaskFailure
        The regions that failed on every attempt, by number.
    """
    caps = adapter.capabilities
    number = list(range(len(regions))) if indices is None else list(indices)

    batch_size = batch_rule(caps, item_bytes)
    with (
        shipping.for_workers(by_value=not caps.shares_modules) as dumps,
        observing(progress, len(regions)) as observers,
    ):

        def make_arg(i: int, attempt: int) -> Any:
            task = build(i, attempt)
            # Pickled here, not by the engine: for workers elsewhere the user's own modules
            # go by value (shipping).
            return dumps(task) if caps.crosses_processes else task

        loop = TaskLoop(
            adapter,
            # Several tasks per call: their forks are combined there (one merge per call).
            functools.partial(run_call, fn, combine=combine),
            retries=retries,
            is_success=lambda out: isinstance(out, TaskOutput) and out.ok,
            describe_error=describe_result,
            is_retryable=lambda out: not isinstance(out, TaskOutput) or out.retryable,
            on_success=on_success,
            batch_size=batch_size,
            backups=backups,
            is_shared=lambda out: isinstance(out, TaskOutput) and out.shared,
            observers=observers if indices is None else [_Renumbered(o, number) for o in observers],
        )
        failed = loop.run(len(regions), make_arg)
    return [_failure(f, number[f.index], regions[f.index]) for f in failed]


def _failure(failed: LoopFailure, index: int, region: Region) -> TaskFailure:
    out = failed.result
    if isinstance(out, TaskOutput):
        return TaskFailure(
            index, region, out.error or "", out.exception, failed.attempts, out.traceback
        )
    # The engine's own failure (a dead worker, a broken pool).
    exc = out if isinstance(out, BaseException) else None
    return TaskFailure(index, region, describe_result(out), exc, failed.attempts)


def describe_result(out: Any) -> str:
    """The text of a failed task's result, or of the engine's exception for it."""
    if isinstance(out, TaskOutput):
        return out.error or "failed"
    if isinstance(out, BaseException):
        return f"{type(out).__name__}: {out}"
    return repr(out)


def _first_line(text: str, limit: int = 300) -> str:
    """The gist of an error for a summary line (the full text is in ``failures``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = " ".join(lines[:2]) if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def region_write_error(
    failures: list[TaskFailure], *, n_regions: int, retries: int, outcome: str
) -> RegionWriteError:
    """The error for regions that failed on every attempt.

    Parameters
    ----------
    failures : list of TaskFailure
        What failed (non-empty).
    n_regions : int
        Regions the call ran.
    retries : int
        Extra attempts each region had.
    outcome : str
        What the failure leaves behind, a clause such as ``"nothing was committed"``, then
        optionally more sentences.

    Returns
    -------
    RegionWriteError
        To raise.
    """
    lines = "\n".join(
        f"  region #{f.index} ({format_region(f.region)}), {f.attempts} attempt(s): "
        + _first_line(f.error)
        for f in failures[:SUMMARY_LINES]
    )
    more = len(failures) - SUMMARY_LINES
    tail = f"\n  ... and {more} more" if more > 0 else ""
    head, _, rest = outcome.partition("\n")
    return RegionWriteError(
        f"{len(failures)} of {n_regions} region(s) failed after {retries + 1} attempt(s) "
        f"each; {head}.\n{lines}{tail}" + (f"\n{rest}" if rest else ""),
        failures,
    )


def shipped_size(obj: Any, what: str, max_arg_bytes: int | None, *, by_value: bool = False) -> int:
    """The pickled size of what one task ships; refuse what cannot ship.

    Parameters
    ----------
    obj : object
        One task's data, or the loader.
    what : str
        What it is, for the messages (``"loader"``, ``"source dataset"``).
    max_arg_bytes : int, optional
        The engine's limit on a call's arguments (Lithops' ``data_limit``).
    by_value : bool, default False
        The user's own modules travel by value (``not Capabilities.shares_modules``).

    Returns
    -------
    int
        Bytes, pickled as tasks are (:func:`~icechunk_distributed.shipping.for_workers`).

    Raises
    ------
    UnpicklableSourceError
        It cannot be pickled.
    PayloadTooLargeError
        It is over :data:`~icechunk_distributed.runner.ARG_HEADROOM` of ``max_arg_bytes``.
    """
    try:
        with shipping.for_workers(by_value=by_value) as dumps:
            size = len(dumps(obj))
    except UnpicklableSourceError:
        raise
    except Exception as exc:
        # Listed only for the message: the scan of sys.modules is not repeated on success.
        local = sorted(shipping.local_modules()) if by_value else []
        shipped = (
            f" For this executor's workers, which may not import them, the modules beside "
            f"your script ({', '.join(local)}) travel by value, module-level objects "
            "included: keep locks, open files and clients inside functions, or install "
            "those modules on the workers."
            if local
            else ""
        )
        raise UnpicklableSourceError(
            f"the {what} {obj!r:.200} cannot be pickled for worker processes ({exc}). "
            "Use executor='threads', or make it picklable: a module-level function "
            "instead of a closure over open files or locks, or a loader that opens the "
            f"data inside the task.{shipped}"
        ) from exc
    if max_arg_bytes is not None and size > ARG_HEADROOM * max_arg_bytes:
        raise PayloadTooLargeError(
            f"one task's data is {size / 2**20:.1f} MiB pickled, over the engine's limit of "
            f"{max_arg_bytes / 2**20:.0f} MiB per call. Pass a loader (load(region) -> "
            "Dataset, with template=) so tasks ship regions instead of data, use a smaller "
            "task_size, or raise the limit (Lithops: config['lithops']['data_limit'] in MiB)."
        )
    return size
