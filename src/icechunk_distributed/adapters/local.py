"""Local executors: inline (serial), thread pools, process pools, any concurrent.futures pool."""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import Any

from icechunk_distributed.adapters.base import (
    IN_FLIGHT_PER_WORKER,
    Adapter,
    Capabilities,
    ItemFeed,
    Outcome,
)

__all__ = ["FuturesAdapter", "SerialAdapter", "safe_mp_context"]


def safe_mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available, else ``spawn``: never ``fork`` (icechunk hangs there)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class SerialAdapter(Adapter):
    """Run every task inline, in order: for debugging and tiny writes."""

    name = "serial"

    @property
    def capabilities(self) -> Capabilities:
        """One task at a time, in this process."""
        return Capabilities(crosses_processes=False, parallelism=1)

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Call ``fn`` on each item in turn (no backups: ``poll`` is never passed)."""
        for key, arg in filter(None, items):
            try:
                yield key, fn(arg)
            except Exception as exc:  # the engine's failure, reported per task
                yield key, exc


class FuturesAdapter(Adapter):
    """Any ``concurrent.futures.Executor``; pools made from a name are owned and shut down.

    Parameters
    ----------
    executor : concurrent.futures.Executor
        The pool. A ``ProcessPoolExecutor`` using the ``fork`` start method is refused.
    owned : bool
        Whether :meth:`close` shuts the pool down.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        owned: bool = False,
        factory: Callable[[], Executor] | None = None,
    ) -> None:
        if isinstance(executor, ProcessPoolExecutor):
            context = getattr(executor, "_mp_context", None)
            if context is not None and context.get_start_method() == "fork":
                raise ValueError(
                    "this ProcessPoolExecutor uses the 'fork' start method, which hangs once "
                    "icechunk has been used in this process. Create it with "
                    "ProcessPoolExecutor(mp_context=multiprocessing.get_context('forkserver')) "
                    "(or 'spawn'), or pass executor='processes'."
                )
        self.executor = executor
        self.owned = owned
        # Futures left running when a caller stopped listening (the losers of backup races):
        # close() must not wait for them. Each one leaves the set when it finishes.
        self._abandoned: set[Future[Any]] = set()
        self._factory = factory
        self._crosses = not isinstance(executor, ThreadPoolExecutor)
        # Pools on this machine, started from this process, import what it imports; any
        # other executor (MPIPoolExecutor, a cluster's executor) may run elsewhere.
        self._local = isinstance(executor, ThreadPoolExecutor | ProcessPoolExecutor) or (
            type(executor).__module__.startswith(("loky.", "joblib."))
        )
        workers = getattr(executor, "_max_workers", None)
        self._parallelism = int(workers) if workers else (os.cpu_count() or 1)
        self.name = {
            ThreadPoolExecutor: "threads",
            ProcessPoolExecutor: "processes",
        }.get(type(executor), type(executor).__name__)

    @classmethod
    def threads(cls, workers: int | None = None) -> FuturesAdapter:
        """A thread pool owned by the adapter."""
        n = workers or min(32, (os.cpu_count() or 1) + 4)
        return cls(ThreadPoolExecutor(n), owned=True, factory=lambda: ThreadPoolExecutor(n))

    @classmethod
    def processes(cls, workers: int | None = None) -> FuturesAdapter:
        """A ``forkserver`` (or ``spawn``) process pool owned by the adapter."""
        n = workers or os.cpu_count() or 1

        def factory() -> Executor:
            return ProcessPoolExecutor(n, mp_context=safe_mp_context())

        return cls(factory(), owned=True, factory=factory)

    def _renew(self, broken: Executor) -> None:
        """Replace a pool broken by a dead worker, when we own it (retries then run there)."""
        if self.owned and self._factory is not None and self.executor is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self.executor = self._factory()

    @property
    def capabilities(self) -> Capabilities:
        """Thread pools share memory; everything else pickles tasks."""
        return Capabilities(
            crosses_processes=self._crosses,
            parallelism=self._parallelism,
            supports_backups=True,
            shares_modules=self._local,
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Keep ``2 x parallelism`` tasks in flight; yield each as it completes."""
        limit = IN_FLIGHT_PER_WORKER * self._parallelism
        feed = ItemFeed(items)
        pending: dict[Future[Any], tuple[Any, Executor]] = {}
        # Futures report here as they finish: one queue operation per task, where
        # concurrent.futures.wait installs a waiter on every pending future at every call.
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        try:
            while True:
                while len(pending) < limit and (item := feed.pull()) is not None:
                    key, arg = item
                    pool = self.executor
                    try:
                        future = pool.submit(fn, arg)
                    except Exception as exc:  # the pool is broken or shut down
                        if isinstance(exc, BrokenExecutor):
                            self._renew(pool)
                        yield key, exc
                    else:
                        pending[future] = (key, pool)
                        future.add_done_callback(finished.put)
                if not pending:
                    return
                for future in _completed(finished, poll):
                    key, pool = pending.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # a worker died, the pool broke, ...
                        if isinstance(exc, BrokenExecutor):
                            self._renew(pool)
                        yield key, exc
                    else:
                        yield key, result
        finally:
            for future in pending:
                if not future.cancel():  # already running: it cannot be stopped
                    self._abandoned.add(future)
                    future.add_done_callback(self._abandoned.discard)

    def close(self) -> None:
        """Shut the pool down if the adapter made it, without waiting for abandoned tasks."""
        if self.owned:
            self.executor.shutdown(wait=not self._abandoned, cancel_futures=True)


def _completed(finished: queue.SimpleQueue[Future[Any]], poll: float | None) -> list[Future[Any]]:
    """The futures finished by now: waits up to ``poll`` seconds (None: forever) for one."""
    try:
        done = [finished.get(timeout=poll)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done
