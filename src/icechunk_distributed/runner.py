"""The generic run loop: submit tasks through an adapter, gather results, retry, back up, report.

It knows nothing about any engine or about icechunk. An adapter turns ``(fn, arg)`` into
results in completion order; :class:`TaskLoop` decides what runs next. Each attempt gets a
freshly built argument (for region writes: a fresh copy of the session fork), so a failed
attempt's writes are never merged. Engines with an expensive call (Lithops) get several tasks
per call (:func:`batch_rule`). With :class:`Backups`, a straggling call gets a second copy
(:func:`pick_straggler` decides which) and the first copy to succeed wins.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from icechunk_distributed.progress import EventKind, ProgressEvent, ProgressObserver

if TYPE_CHECKING:
    from icechunk_distributed.adapters import Adapter, Capabilities

__all__ = [
    "ARG_HEADROOM",
    "CALLS_PER_SLOT",
    "CHEAP_CALLS_PER_SLOT",
    "MAX_TASKS_PER_CHEAP_CALL",
    "TASK_FRAMING_BYTES",
    "Backups",
    "LoopFailure",
    "TaskLoop",
    "batch_rule",
    "pick_straggler",
    "run_batch",
]

CALLS_PER_SLOT = 2
"""Calls per worker slot in one round when tasks are batched: enough to keep every worker
busy while the slowest call of the round finishes, few enough to pay the per-call cost rarely."""

ARG_HEADROOM = 0.8
"""Of an engine's limit on a call's argument, the share the data may use (the rest is for the
task's own fields and pickling overhead)."""

CHEAP_CALLS_PER_SLOT = 32
"""Where calls are cheap: calls per worker slot in a round below which tasks go one per call."""

MAX_TASKS_PER_CHEAP_CALL = 16
"""Where calls are cheap: tasks per call at most, when a round has many more than
:data:`CHEAP_CALLS_PER_SLOT` per slot. A call is a pool submission, a future, a wake-up of the
coordinator under the GIL (measured: 50-70 us of its CPU per call on a 2-thread pool whose tasks
hold the GIL for 2-5 ms); grouping tiny tasks spreads that over several, and a round keeps
at least 32 calls per slot to balance the load at its end."""

TASK_FRAMING_BYTES = 2048
"""Bytes one task adds to a batched call besides its data (the snapshot, region, encodings)."""

Group = tuple[int, ...]
"""The tasks one engine call runs (one task, or a batch)."""


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


def pick_straggler(
    rule: Backups,
    *,
    running: Mapping[Group, float],
    backed_up: Collection[Group],
    durations: Sequence[float],
    n_round: int,
    n_unresolved: int,
    now: float,
) -> Group | None:
    """The call to back up now, if any: a pure function of the round's state.

    Parameters
    ----------
    rule : Backups
        The thresholds.
    running : mapping
        Unresolved calls of the round and when their first copy was submitted (monotonic
        seconds), oldest first.
    backed_up : collection
        Calls already backed up this round (one backup each).
    durations : sequence of float
        How long calls that ran as a single copy took to succeed, this run.
    n_round, n_unresolved : int
        Tasks in the round, and those without a result yet.
    now : float
        The current monotonic time.

    Returns
    -------
    tuple of int or None
        The first call that has run longer than ``factor`` x the median duration (and at
        least ``min_seconds``), once ``min_done`` of the round has finished.
    """
    if not durations or n_round - n_unresolved < rule.min_done * n_round:
        return None
    limit = max(rule.min_seconds, rule.factor * statistics.median(durations))
    return next((g for g, t0 in running.items() if g not in backed_up and now - t0 > limit), None)


def batch_rule(caps: Capabilities, item_bytes: int) -> Callable[[int], int]:
    """Tasks per call, given the tasks pending in a round.

    Engines whose calls are expensive get at most :data:`CALLS_PER_SLOT` calls per worker
    slot per round, and never more data per call than the engine accepts
    (:data:`ARG_HEADROOM` of ``max_arg_bytes``). Elsewhere a round of many tasks is grouped
    into calls of at most :data:`MAX_TASKS_PER_CHEAP_CALL`, keeping at least
    :data:`CHEAP_CALLS_PER_SLOT` calls per slot; a round of fewer tasks goes one per call.
    """
    if caps.per_call_overhead <= 0:
        slots = CHEAP_CALLS_PER_SLOT * max(1, caps.parallelism)

        def cheap(n_pending: int) -> int:
            return max(1, min(MAX_TASKS_PER_CHEAP_CALL, n_pending // slots))

        return cheap
    cap = None
    if caps.max_arg_bytes and item_bytes:
        room = int(ARG_HEADROOM * caps.max_arg_bytes)
        cap = max(1, room // (item_bytes + TASK_FRAMING_BYTES))

    def size(n_pending: int) -> int:
        per_call = max(1, -(-n_pending // (CALLS_PER_SLOT * max(1, caps.parallelism))))
        return per_call if cap is None else min(per_call, cap)

    return size


def run_batch(fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
    """Run ``fn`` over ``args`` in one call (one engine call, several tasks)."""
    return [fn(arg) for arg in args]


@dataclass(frozen=True)
class LoopFailure:
    """A task that used all its attempts: its last result (or the engine's exception)."""

    index: int
    result: Any
    attempts: int


@dataclass
class _Round:
    """One round's book-keeping: what is unresolved, in flight and backed up."""

    keys: list[int]
    unresolved: set[int]
    started: set[int] = field(default_factory=set)
    retry: list[int] = field(default_factory=list)
    copies: dict[Group, int] = field(default_factory=dict)  # copies of a call in flight
    since: dict[Group, float] = field(default_factory=dict)  # first copy's submission
    backed_up: set[Group] = field(default_factory=set)
    announce: list[int] = field(default_factory=list)  # backups to report from gather


class TaskLoop:
    """Runs ``fn(make_arg(i, attempt))`` for every task through an adapter, in rounds.

    Parameters
    ----------
    adapter : Adapter
        The engine.
    fn : callable
        The task function (``run_batch``-wrapped when ``batch_size`` is given).
    retries : int
        Extra attempts per task.
    is_success : callable
        Whether a result is a success.
    describe_error : callable
        The text of a failed result, for progress events.
    is_retryable : callable, optional
        Whether another attempt could fix a failed result (default: always).
    on_success : callable
        ``on_success(i, result, attempts)``, once per task, for the first copy that
        succeeds, as soon as it arrives (merge there: nothing is held back). An exception
        from it ends the run.
    batch_size : callable, optional
        Tasks per call given the tasks pending in a round (:func:`batch_rule`); the adapter
        then runs ``fn([arg, ...])``, which returns one result per argument, in order.
    backups : Backups, optional
        Straggler backups, for adapters that declare ``supports_backups``.
    is_shared : callable, optional
        Whether a call's results share one snapshot (written by all its tasks): such a
        call is taken whole or not at all. If another copy of the call already resolved
        some of its tasks, the others go again (not counted as a failure) rather than merge
        the first ones' writes twice.
    observers : sequence of ProgressObserver
        Receive every event (closing them is the caller's job).

    Notes
    -----
    A round hands every pending task to the engine; tasks that failed go into the next
    round. The steps are :meth:`submit` (one call's arguments), :meth:`gather` (results in
    completion order), :meth:`settle_failure` (retry or give up), :meth:`backup` (the next
    straggler) and :meth:`report` (an event to the observers).
    """

    def __init__(
        self,
        adapter: Adapter,
        fn: Callable[[Any], Any],
        *,
        retries: int,
        is_success: Callable[[Any], bool],
        describe_error: Callable[[Any], str],
        on_success: Callable[[int, Any, int], None],
        is_retryable: Callable[[Any], bool] | None = None,
        batch_size: Callable[[int], int] | None = None,
        backups: Backups | None = None,
        is_shared: Callable[[Any], bool] | None = None,
        observers: Sequence[ProgressObserver] = (),
    ) -> None:
        self.adapter, self.fn, self.retries = adapter, fn, retries
        self.is_shared = is_shared
        self.is_success, self.describe_error = is_success, describe_error
        self.is_retryable = is_retryable
        self.on_success = on_success
        self.batch_size = batch_size
        supported = adapter.capabilities.supports_backups
        self.backups = backups if backups is not None and supported else None
        self.observers = list(observers)
        self.failures: list[LoopFailure] = []
        self.n_total = self.n_done = 0
        self._make_arg: Callable[[int, int], Any] = _unset
        self._attempts: list[int] = []  # launched, backups included: what make_arg is told
        self._failed: list[int] = []  # failed: the retry budget
        self._durations: list[float] = []  # single-copy calls that succeeded: the yardstick
        self._round = _Round([], set())

    # -- the run
    def run(self, n: int, make_arg: Callable[[int, int], Any]) -> list[LoopFailure]:
        """Run tasks ``0..n-1``; return those that failed on every attempt, by index.

        ``make_arg(i, attempt)`` builds task ``i``'s argument for an attempt (1 for the
        first), only when the engine has room for it.
        """
        self._make_arg = make_arg
        self.n_total, self.n_done = n, 0
        self.failures = []
        self._attempts, self._failed, self._durations = [0] * n, [0] * n, []
        pending = list(range(n))
        while pending:
            pending = self._run_round(pending)
        return sorted(self.failures, key=lambda f: f.index)

    def _run_round(self, keys: list[int]) -> list[int]:
        """Hand ``keys`` to the engine and gather every result; return the tasks to retry."""
        rnd = self._round = _Round(keys, set(keys))
        items = self._calls(rnd)
        if self.backups is None:
            results = self.adapter.map_unordered(self.fn, items)
        else:
            results = self.adapter.map_unordered(self.fn, items, poll=self.backups.poll)
        try:
            self.gather(results)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # cancels what has not started, also when a callback raised
        self._flush_backups()
        # An engine that ended without answering for some task: that attempt failed.
        for j in sorted(rnd.unresolved):
            if j not in rnd.started:
                self._attempts[j] += 1
            self.settle_failure(j, RuntimeError(f"the executor returned no result for task {j}"))
        return list(rnd.retry)

    def _calls(self, rnd: _Round) -> Iterator[tuple[Group, Any] | None]:
        """The round's calls for the adapter, built lazily; then backups of stragglers."""
        size = self.batch_size(len(rnd.keys)) if self.batch_size is not None else 1
        for start in range(0, len(rnd.keys), size):
            group = tuple(rnd.keys[start : start + size])
            yield group, self.submit(group)
        # The round's tail: None tells the adapter "nothing now, ask again after a completion
        # or `poll` seconds", so stragglers are found even while nothing finishes.
        while self.backups is not None and rnd.unresolved:
            slow = self.backup()
            if slow is None:
                yield None
            else:
                # Reported by gather, not here: this generator runs inside the adapter, where
                # an exception from an observer would pass for the engine's own failure.
                rnd.announce.extend(slow)
                yield slow, self.submit(slow)

    # -- the steps
    def submit(self, group: Group) -> Any:
        """Build the arguments of one copy of a call (a new attempt of each of its tasks)."""
        rnd = self._round
        args = []
        for i in group:
            self._attempts[i] += 1
            rnd.started.add(i)
            args.append(self._make_arg(i, self._attempts[i]))
        rnd.copies[group] = rnd.copies.get(group, 0) + 1
        rnd.since.setdefault(group, time.monotonic())  # the adapter submits as we yield
        return args[0] if self.batch_size is None else args

    def backup(self) -> Group | None:
        """The straggling call to launch a backup copy of now, if any (marked backed up)."""
        assert self.backups is not None
        rnd = self._round
        slow = pick_straggler(
            self.backups,
            running=rnd.since,
            backed_up=rnd.backed_up,
            durations=self._durations,
            n_round=len(rnd.keys),
            n_unresolved=len(rnd.unresolved),
            now=time.monotonic(),
        )
        if slow is not None:
            rnd.backed_up.add(slow)
        return slow

    def gather(self, results: Iterator[Any]) -> None:
        """Take results in completion order until the round is resolved or the engine ends."""
        rnd = self._round
        while True:
            if self.backups is not None and not rnd.unresolved:
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
                self._engine_failed(exc)
                return
            self._flush_backups()
            self._take(group, result)

    def settle_failure(self, i: int, result: Any) -> None:
        """Task ``i`` failed this attempt: queue a retry, or record it as failed for good."""
        error = self.describe_error(result)
        self._failed[i] += 1
        retryable = self.is_retryable is None or self.is_retryable(result)
        if self._failed[i] <= self.retries and retryable:
            self._round.retry.append(i)
            self.report("retry", i, error)
        else:
            self.failures.append(LoopFailure(i, result, self._attempts[i]))
            self.report("failed", i, error)

    def report(self, kind: EventKind, i: int, error: str | None = None) -> None:
        """Send an event about task ``i`` to every observer."""
        if not self.observers:
            return  # nobody listens: no event is made (one per task otherwise)
        event = ProgressEvent(
            kind, i, self._attempts[i], self.n_done, len(self.failures), self.n_total, error
        )
        for observer in self.observers:
            observer.on_event(event)

    # -- helpers of gather
    def _take(self, group: Group, result: Any) -> None:
        """One call's result: each of its tasks succeeded, failed, or was already resolved."""
        rnd = self._round
        rnd.copies[group] -= 1
        t0 = rnd.since.get(group)
        if self.batch_size is None:
            pairs = [(group[0], result)]
        elif isinstance(result, BaseException) or not isinstance(result, list):
            pairs = [(i, result) for i in group]  # the whole call failed
        else:
            pairs = list(zip(group, result, strict=True))
            if self._partly_resolved(group, result):
                return
        all_ok = True
        for i, res in pairs:
            if i not in rnd.unresolved:
                continue  # the slower copy of a task already resolved: never merged
            if self.is_success(res):
                rnd.unresolved.discard(i)
                self.on_success(i, res, self._attempts[i])
                self.n_done += 1
                self.report("done", i)
            else:
                all_ok = False
                if not rnd.copies[group]:  # else the other copy, still running, decides
                    rnd.unresolved.discard(i)
                    self.settle_failure(i, res)
        if all_ok and group not in rnd.backed_up and t0 is not None:
            self._durations.append(time.monotonic() - t0)
        if rnd.unresolved.isdisjoint(group):
            rnd.since.pop(group, None)

    def _partly_resolved(self, group: Group, result: list[Any]) -> bool:
        """Whether ``result`` is shared and another copy resolved some of its tasks.

        Its open tasks then go again: their writes come with the others', which must not
        be merged twice.
        """
        if self.is_shared is None or not result or not self.is_shared(result[0]):
            return False
        rnd = self._round
        open_tasks = [i for i in group if i in rnd.unresolved]
        if len(open_tasks) in (0, len(group)):
            return False
        for i in open_tasks:
            rnd.unresolved.discard(i)
            rnd.retry.append(i)
        if rnd.unresolved.isdisjoint(group):
            rnd.since.pop(group, None)
        return True

    def _engine_failed(self, exc: Exception) -> None:
        """The engine failed as a whole (e.g. joblib lost a worker).

        Every task of the round without a result failed this attempt; those never started
        just go again.
        """
        rnd = self._round
        self._flush_backups()
        for j in sorted(rnd.unresolved):
            if j in rnd.started or not rnd.started:
                if j not in rnd.started:
                    self._attempts[j] += 1
                self.settle_failure(j, exc)
            else:
                rnd.retry.append(j)
        rnd.unresolved.clear()

    def _flush_backups(self) -> None:
        announce = self._round.announce
        while announce:
            self.report("backup", announce.pop(0))


def _unset(i: int, attempt: int) -> Any:
    raise RuntimeError("TaskLoop.run() sets the argument builder")
