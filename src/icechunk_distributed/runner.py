"""The generic loop: fan tasks out through an adapter, batch, retry failures, report progress.

It knows nothing about any engine: adapters turn ``(fn, arg)`` into results in completion
order; this loop decides what to run next. Each attempt gets a freshly built argument (for
region writes: a fresh copy of the session fork), so a failed attempt's writes are never
merged. Engines with an expensive call (Lithops) get several tasks per call. With
:class:`Backups`, a straggling task gets a second copy and the first copy to succeed wins.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from icechunk_distributed.adapters import Adapter

__all__ = ["Backups", "ProgressEvent", "run_batch", "run_loop"]

_Kind = Literal["done", "retry", "failed", "backup"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run, passed to ``progress=`` callbacks.

    Attributes
    ----------
    kind : {"done", "retry", "failed", "backup"}
        A task finished; a task failed and will be retried; a task failed for good; a backup
        copy of a straggling task was launched (see :class:`Backups`).
    index : int
        The task (region) index.
    attempt : int
        Attempts launched for the task so far, backups included (1 for the first).
    n_done, n_failed, n_total : int
        Tasks finished, failed for good, and in all.
    error : str or None
        The failure, for ``retry`` and ``failed``.
    """

    kind: _Kind
    index: int
    attempt: int
    n_done: int
    n_failed: int
    n_total: int
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class Backups:
    """Straggler backups: launch a second copy of a task that runs far longer than the rest.

    Once most of a round's tasks have finished, a task still running after ``factor`` times
    the median task duration is launched again on a freshly built argument (a new attempt,
    which does not use up the retry budget). The first copy to succeed is kept; the other's
    result is dropped, never merged. Only engines whose adapter declares
    ``supports_backups`` run backups; elsewhere the option is ignored.

    Attributes
    ----------
    factor : float
        A running task is a straggler once it has run longer than ``factor`` x the median
        duration of the tasks completed so far in the run (at least 1).
    min_done : float
        Fraction of the round's tasks that must have finished before any backup is launched
        (0 to 1).
    min_seconds : float
        Never back up a task that has run less than this many seconds.
    poll : float
        Seconds between looks for stragglers while the last tasks of a round run.

    Notes
    -----
    A task's duration counts from its submission to the engine, so time spent queued on a
    busy engine counts too. Backups cost duplicate work and need tasks that are safe to run
    twice (region writes are: each copy writes its own fork copy, and only one is merged).
    """

    factor: float = 3.0
    min_done: float = 0.5
    min_seconds: float = 1.0
    poll: float = 0.25

    def __post_init__(self) -> None:
        rules = [
            ("factor", self.factor >= 1, "at least 1"),
            ("min_done", 0 <= self.min_done <= 1, "a fraction between 0 and 1"),
            ("min_seconds", self.min_seconds >= 0, "zero or more"),
            ("poll", 0 < self.poll < math.inf, "a positive, finite number of seconds"),
        ]
        for name, ok, rule in rules:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ValueError(f"Backups({name}={getattr(self, name)!r}): must be {rule}")


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
    is_retryable: Callable[[Any], bool] | None = None,
    on_success: Callable[[int, Any, int], None],
    on_failure: Callable[[int, Any, int], None],
    on_event: Callable[[ProgressEvent], None] | None = None,
    batch_size: Callable[[int], int] | None = None,
    pack: Callable[[list[Any]], Any] | None = None,
    backups: Backups | None = None,
) -> None:
    """Run ``fn(make_arg(i, attempt))`` for ``i`` in ``range(n)``, retrying up to ``retries``.

    ``result`` given to the callbacks is what the task returned, or the exception the engine
    raised for it (a dead worker, a broken pool); their last argument is the number of
    attempts launched for the task. ``on_success`` is called as each task succeeds (merge
    there: nothing is held back); ``on_failure`` once per task that used all its attempts.
    Exceptions raised by the callbacks end the run. Rounds: tasks that fail are retried after
    the current round's tasks have all been handed to the engine.

    With ``batch_size`` (tasks per call, given the tasks pending in a round), the adapter runs
    ``fn(pack([arg, ...]))``, which must return one result per argument, in order.

    With ``backups`` and an adapter that ``supports_backups``, straggling calls get one backup
    copy each (see :class:`Backups`); ``on_success`` still runs once per task, for the first
    copy that succeeds, and a task fails only when no copy of it is left running.

    A failure for which ``is_retryable(result)`` is False is not retried (another attempt
    cannot fix it).
    """
    policy = backups if backups is not None and adapter.capabilities.supports_backups else None
    attempts = [0] * n  # attempts launched, backups included: what make_arg is told
    failures = [0] * n  # attempts failed: the retry budget
    pending = list(range(n))
    n_done = n_failed = 0
    started: set[int] = set()
    retry: list[int] = []
    outstanding: set[int] = set()
    # Per round, by call (group of task indices): copies in flight, when the first copy of an
    # unresolved call was submitted, and calls already backed up. Per run: how long calls
    # that ran as a single copy took to succeed (the yardstick for stragglers).
    copies: dict[tuple[int, ...], int] = {}
    since: dict[tuple[int, ...], float] = {}
    backed: set[tuple[int, ...]] = set()
    durations: list[float] = []
    # Backup events are emitted by drain, not by the item generator, which runs inside the
    # adapter: an exception from on_event there would pass for the engine's own failure.
    announce: list[int] = []

    def emit(kind: _Kind, i: int, error: str | None = None) -> None:
        if on_event is not None:
            on_event(ProgressEvent(kind, i, attempts[i], n_done, n_failed, n, error))

    def flush() -> None:
        while announce:
            emit("backup", announce.pop(0))

    def failed(i: int, result: Any) -> None:
        nonlocal n_failed
        error = describe_error(result)
        failures[i] += 1
        if failures[i] <= retries and (is_retryable is None or is_retryable(result)):
            retry.append(i)
            emit("retry", i, error)
        else:
            n_failed += 1
            on_failure(i, result, attempts[i])
            emit("failed", i, error)

    def launch(group: tuple[int, ...]) -> Any:
        args = []
        for i in group:
            attempts[i] += 1
            started.add(i)
            args.append(make_arg(i, attempts[i]))
        copies[group] = copies.get(group, 0) + 1
        since.setdefault(group, time.monotonic())  # the adapter submits as soon as we yield
        if batch_size is None:
            return args[0]
        return pack(args) if pack is not None else args

    def straggler(rule: Backups, n_round: int) -> tuple[int, ...] | None:
        if not durations or n_round - len(outstanding) < rule.min_done * n_round:
            return None
        limit = max(rule.min_seconds, rule.factor * statistics.median(durations))
        now = time.monotonic()
        return next((g for g, t0 in since.items() if g not in backed and now - t0 > limit), None)

    def calls(keys: list[int]) -> Iterator[tuple[tuple[int, ...], Any] | None]:
        size = batch_size(len(keys)) if batch_size is not None else 1
        for start in range(0, len(keys), size):
            group = tuple(keys[start : start + size])
            yield group, launch(group)
        # The round's tail: None tells the adapter "nothing now, ask again after a completion
        # or `poll` seconds", so stragglers are found even while nothing finishes.
        while policy is not None and outstanding:
            slow = straggler(policy, len(keys))
            if slow is None:
                yield None
            else:
                backed.add(slow)
                arg = launch(slow)
                announce.extend(slow)
                yield slow, arg

    def drain(results: Iterator[Any]) -> None:
        nonlocal n_done
        while True:
            if policy is not None and not outstanding:
                # Every task is resolved: abandon the slower copies still running (closing
                # `results` cancels what the engine can). Without backups, the engine ends
                # by itself; closing it early could make it tear down its workers (joblib).
                return
            # Only the engine's own iteration is guarded: an exception from our callbacks
            # (a refused merge, say) must propagate, never pass for an engine failure.
            try:
                group, result = next(results)
            except StopIteration:
                return
            except Exception as exc:
                # The engine failed as a whole (e.g. joblib lost a worker): every task of
                # this round without a result failed this attempt.
                flush()
                for j in sorted(outstanding):
                    if j in started or not started:
                        if j not in started:
                            attempts[j] += 1
                        failed(j, exc)
                    else:
                        retry.append(j)
                outstanding.clear()
                return
            flush()
            copies[group] -= 1
            t0 = since.get(group)
            if batch_size is None:
                pairs = [(group[0], result)]
            elif isinstance(result, BaseException) or not isinstance(result, list):
                pairs = [(i, result) for i in group]  # the whole call failed
            else:
                pairs = list(zip(group, result, strict=True))
            all_ok = True
            for i, res in pairs:
                if i not in outstanding:
                    continue  # the slower copy of a task already resolved: never merged
                if is_success(res):
                    outstanding.discard(i)
                    on_success(i, res, attempts[i])
                    n_done += 1
                    emit("done", i)
                else:
                    all_ok = False
                    if not copies[group]:  # else the other copy, still running, decides
                        outstanding.discard(i)
                        failed(i, res)
            if all_ok and group not in backed and t0 is not None:
                durations.append(time.monotonic() - t0)
            if outstanding.isdisjoint(group):
                since.pop(group, None)

    while pending:
        outstanding.clear()
        outstanding.update(pending)
        started.clear()
        retry.clear()
        copies.clear()
        since.clear()
        backed.clear()
        items = calls(pending)
        if policy is None:
            results = adapter.map_unordered(fn, items)
        else:
            results = adapter.map_unordered(fn, items, poll=policy.poll)
        try:
            drain(results)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # cancels what has not started, also when a callback raised
        flush()
        # An engine that ended without answering for some task: that attempt failed.
        for j in sorted(outstanding):
            if j not in started:
                attempts[j] += 1
            failed(j, RuntimeError(f"the executor returned no result for task {j}"))
        pending = list(retry)
