"""Lithops: serverless functions (or its localhost backend), with regions batched per call."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from icechunk_distributed.adapters.base import (
    Adapter,
    Capabilities,
    ItemFeed,
    Outcome,
    import_engine,
)

__all__ = ["LithopsAdapter", "localhost_config"]

DATA_LIMIT_MIB = 4
"""Lithops refuses call arguments over this many MiB unless ``data_limit`` is raised."""

_SESSION_PID: int | None = None


def _own_session() -> None:
    """Give this process its own Lithops session id, once.

    Lithops passes its session id and executor count to child processes through the
    environment, so two coordinators started by one parent both name their first executor
    ``<parent session>-1``, and the second reads the first one's stored results (seen on
    localhost after a killed coordinator: its tasks "returned" forks of another run, which
    ``merge_sessions`` refused). A fresh session id per process keeps their keys apart.
    """
    global _SESSION_PID
    import os
    import uuid

    if os.getpid() != _SESSION_PID:
        os.environ["__LITHOPS_SESSION_ID"] = uuid.uuid4().hex[:6]
        os.environ.pop("__LITHOPS_TOTAL_EXECUTORS", None)
        _SESSION_PID = os.getpid()


def localhost_config(workers: int | None = None) -> dict[str, Any]:
    """A Lithops configuration that runs functions as local processes of this interpreter.

    Parameters
    ----------
    workers : int, optional
        Local worker processes (CPU count by default).

    Returns
    -------
    dict
        ``{'lithops': {...}, 'localhost': {...}}`` with ``runtime`` = ``sys.executable``, so it
        works inside a virtualenv (Lithops runs ``python`` from PATH otherwise).
    """
    localhost: dict[str, Any] = {"runtime": sys.executable, "version": 1}
    if workers:
        localhost["worker_processes"] = workers
    return {"lithops": {"backend": "localhost", "storage": "localhost"}, "localhost": localhost}


def _call(arg: bytes) -> Any:
    # One positional parameter, not named storage/id/ibm_cos/rabbitmq (Lithops injects
    # those), and bytes rather than a dict (Lithops spreads a dict into keyword arguments).
    import cloudpickle

    fn, payload = cloudpickle.loads(arg)
    return fn(payload)


JOB_DATA_SHARE = 0.8
"""Of ``data_limit``, the share one ``map`` job's arguments may use (Lithops adds its own)."""


def _jobs(args: list[bytes], data_limit: int | None) -> list[list[int]]:
    """Indices of ``args`` grouped into ``map`` jobs whose total size fits ``data_limit``.

    Lithops checks the total data of a job, not of one call ("Total data exceeded maximum
    size"): a round of calls that fit one by one may still be refused together.
    """
    if not args:
        return []
    if not data_limit:
        return [list(range(len(args)))]
    budget = JOB_DATA_SHARE * data_limit
    jobs: list[list[int]] = [[]]
    used = 0
    for i, arg in enumerate(args):
        if jobs[-1] and used + len(arg) > budget:
            jobs.append([])
            used = 0
        jobs[-1].append(i)
        used += len(arg)
    return jobs


class LithopsAdapter(Adapter):
    """Run tasks with a Lithops ``FunctionExecutor``.

    Parameters
    ----------
    executor : lithops.FunctionExecutor, optional
        The caller's executor (not cleaned up by the adapter).
    config : dict, optional
        A Lithops config for an executor the adapter makes; :func:`localhost_config` by default.
    workers : int, optional
        Parallelism assumed for batching (the localhost worker count by default).

    Notes
    -----
    Every Lithops call has a fixed cost (~0.4 s on localhost, more in the cloud), so this adapter
    declares a per-call overhead: the generic loop then batches regions, at most two calls per
    worker per round (240 one-chunk regions on 2 workers: 4 calls). Call arguments must stay
    under Lithops' ``data_limit`` (4 MiB by default): a loader source ships regions, not data.
    Straggler backups need calls that run side by side across jobs: not on the localhost
    backend's version 1 (the default of :func:`localhost_config`), which runs jobs in turn.
    """

    name = "lithops"

    def __init__(
        self,
        executor: Any = None,
        *,
        config: dict[str, Any] | None = None,
        workers: int | None = None,
    ) -> None:
        lithops = import_engine("lithops", "lithops")
        self._owned = executor is None
        if executor is None:
            import os

            config = config or localhost_config(workers)
            _own_session()
            executor = lithops.FunctionExecutor(config=config, log_level=None)
            workers = workers or config.get("localhost", {}).get("worker_processes")
            workers = workers or os.cpu_count() or 1
        self.executor = executor
        settings = getattr(executor, "config", {})
        self._workers = workers or settings.get("lithops", {}).get("max_workers", 8)
        limit = settings.get("lithops", {}).get("data_limit", DATA_LIMIT_MIB)
        self.data_limit = int(limit * 2**20) if limit else None
        # Localhost v1 runs one job (map) after another: a backup would only start once the
        # straggler's job had ended. Cloud backends and localhost v2 run calls side by side.
        self._backups = not (
            settings.get("lithops", {}).get("backend") == "localhost"
            and settings.get("localhost", {}).get("version", 2) == 1
        )
        self.n_calls = 0  # Lithops calls made, for the record (each costs ~0.4 s or more)

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; calls are expensive, so regions are batched."""
        return Capabilities(
            crosses_processes=True,
            parallelism=int(self._workers),
            per_call_overhead=0.4,
            max_arg_bytes=self.data_limit,
            supports_backups=self._backups,
            # Functions run in Lithops' own runner, even on localhost: not from this
            # process's directory or sys.path.
            shares_modules=False,
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Submit every call available at once (one ``map``); yield results as calls finish.

        With ``poll``, statuses are checked every ``poll`` seconds and calls that became
        available meanwhile (backups) go out in a further ``map``. Lithops cannot cancel:
        an abandoned call runs to its end.
        """
        import cloudpickle
        from lithops.wait import ALWAYS, ANY_COMPLETED

        feed = ItemFeed(items)
        keys: dict[int, Any] = {}  # id(future) -> key
        pending: list[Any] = []

        def submit() -> None:
            batch = list(iter(feed.pull, None))  # everything available now
            args = [cloudpickle.dumps((fn, a)) for _, a in batch]
            for job in _jobs(args, self.data_limit):
                # include_modules=[]: Lithops ships no modules (its module shipping raced
                # once). Nothing needs it: the user's own code travels by value inside each
                # argument (icechunk_distributed.shipping); installed packages must be in
                # the runtime.
                futures = self.executor.map(_call, [args[i] for i in job], include_modules=[])
                self.n_calls += len(job)
                keys.update((id(f), batch[i][0]) for f, i in zip(futures, job, strict=True))
                pending.extend(futures)

        submit()
        while pending:
            # Lithops' own wait timeout fails the futures waited on, so polling is a
            # non-blocking status check (ALWAYS) and a sleep.
            done, not_done = self.executor.wait(
                pending,
                throw_except=False,
                return_when=ANY_COMPLETED if poll is None else ALWAYS,
                show_progressbar=False,
            )
            pending[:] = not_done
            if poll is not None and not done:
                time.sleep(poll)
            for future in done:
                key = keys.pop(id(future))
                try:
                    yield key, future.result(throw_except=True)
                except Exception as exc:  # the function or its runner process failed
                    yield key, exc
            if poll is not None:
                submit()

    def close(self) -> None:
        """Clean up the executor if the adapter made it."""
        if self._owned:
            with contextlib.suppress(Exception):  # best effort: temporary files only
                self.executor.clean()
