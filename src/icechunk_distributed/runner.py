"""The generic loop: fan tasks out through an adapter, batch, retry failures, report progress.

It knows nothing about any engine: adapters turn ``(fn, arg)`` into results in completion
order; this loop decides what to run next. Each attempt gets a freshly built argument (for
region writes: a fresh copy of the session fork), so a failed attempt's writes are never
merged. Engines with an expensive call (Lithops) get several tasks per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from icechunk_distributed.adapters import Adapter

__all__ = ["ProgressEvent", "run_batch", "run_loop"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run, passed to ``progress=`` callbacks.

    Attributes
    ----------
    kind : {"done", "retry", "failed"}
        A task finished; a task failed and will be retried; a task failed for good.
    index : int
        The task (region) index.
    attempt : int
        Which attempt this was (1 for the first).
    n_done, n_failed, n_total : int
        Tasks finished, failed for good, and in all.
    error : str or None
        The failure, for ``retry`` and ``failed``.
    """

    kind: Literal["done", "retry", "failed"]
    index: int
    attempt: int
    n_done: int
    n_failed: int
    n_total: int
    error: str | None = None


def run_batch(fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
    """Run ``fn`` over ``args`` in one call (one engine call, several tasks)."""
    return [fn(arg) for arg in args]


def run_loop(
    adapter: Adapter,
    fn: Callable[[Any], Any],
    n: int,
    make_arg: Callable[[int, int], Any],
    *,
    retries: int,
    is_success: Callable[[Any], bool],
    describe_error: Callable[[Any], str],
    on_success: Callable[[int, Any, int], None],
    on_failure: Callable[[int, Any, int], None],
    on_event: Callable[[ProgressEvent], None] | None = None,
    batch_size: Callable[[int], int] | None = None,
    pack: Callable[[list[Any]], Any] | None = None,
) -> None:
    """Run ``fn(make_arg(i, attempt))`` for ``i`` in ``range(n)``, retrying up to ``retries``.

    ``result`` given to the callbacks is what the task returned, or the exception the engine
    raised for it (a dead worker, a broken pool). ``on_success`` is called as each task
    succeeds (merge there: nothing is held back); ``on_failure`` once per task that used all
    its attempts. Exceptions raised by the callbacks end the run. Rounds: tasks that fail are
    retried after the current round's tasks have all been handed to the engine.

    With ``batch_size`` (tasks per call, given the tasks pending in a round), the adapter runs
    ``fn(pack([arg, ...]))``, which must return one result per argument, in order.
    """
    attempts = [0] * n
    pending = list(range(n))
    n_done = n_failed = 0
    started: set[int] = set()
    retry: list[int] = []
    outstanding: set[int] = set()

    def emit(kind: Literal["done", "retry", "failed"], i: int, error: str | None = None) -> None:
        if on_event is not None:
            on_event(ProgressEvent(kind, i, attempts[i], n_done, n_failed, n, error))

    def failed(i: int, result: Any) -> None:
        nonlocal n_failed
        error = describe_error(result)
        if attempts[i] <= retries:
            retry.append(i)
            emit("retry", i, error)
        else:
            n_failed += 1
            on_failure(i, result, attempts[i])
            emit("failed", i, error)

    def calls(keys: list[int]) -> Any:
        size = batch_size(len(keys)) if batch_size is not None else 1
        for start in range(0, len(keys), size):
            group = tuple(keys[start : start + size])
            args = []
            for i in group:
                attempts[i] += 1
                started.add(i)
                args.append(make_arg(i, attempts[i]))
            if batch_size is None:
                yield group, args[0]
            else:
                yield group, (pack(args) if pack is not None else args)

    def drain(results: Any) -> None:
        nonlocal n_done
        while True:
            # Only the engine's own iteration is guarded: an exception from our callbacks
            # (a refused merge, say) must propagate, never pass for an engine failure.
            try:
                group, result = next(results)
            except StopIteration:
                return
            except Exception as exc:
                # The engine failed as a whole (e.g. joblib lost a worker): every task of
                # this round without a result failed this attempt.
                for j in sorted(outstanding):
                    if j in started or not started:
                        if j not in started:
                            attempts[j] += 1
                        failed(j, exc)
                    else:
                        retry.append(j)
                outstanding.clear()
                return
            if batch_size is None:
                pairs = [(group[0], result)]
            elif isinstance(result, BaseException) or not isinstance(result, list):
                pairs = [(i, result) for i in group]  # the whole call failed
            else:
                pairs = list(zip(group, result, strict=True))
            for i, res in pairs:
                outstanding.discard(i)
                if is_success(res):
                    on_success(i, res, attempts[i])
                    n_done += 1
                    emit("done", i)
                else:
                    failed(i, res)

    while pending:
        outstanding.clear()
        outstanding.update(pending)
        started.clear()
        retry.clear()
        results = adapter.map_unordered(fn, calls(pending))
        try:
            drain(results)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # cancels what has not started, also when a callback raised
        # An engine that ended without answering for some task: that attempt failed.
        for j in sorted(outstanding):
            if j not in started:
                attempts[j] += 1
            failed(j, RuntimeError(f"the executor returned no result for task {j}"))
        pending = list(retry)
