"""Ray: tasks as Ray remote functions, results in completion order (``ray.wait``)."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from icechunk_distributed.adapters.base import (
    IN_FLIGHT_PER_WORKER,
    Adapter,
    Capabilities,
    ItemFeed,
    Outcome,
    import_engine,
)

__all__ = ["RayAdapter"]

_RECOUNT = 1.0
"""Seconds between counts of the cluster's CPUs while waiting for completions."""


class RayAdapter(Adapter):
    """Run tasks on Ray: the Ray this process already joined, a cluster, or a local Ray.

    Which Ray, in order:

    1. the one this process is the driver of (``ray.init`` was called): used as it is, and
       left running;
    2. else the cluster at ``address``, or at ``RAY_ADDRESS`` (exported by you, or set by
       ``ray job submit`` for its entrypoint): joined with ``ray.init(address=...)``, and
       left (``ray.shutdown`` disconnects this driver; the cluster keeps running);
    3. else a local Ray started here (``num_cpus`` CPUs, no dashboard) and stopped by
       :meth:`close`.

    Parameters
    ----------
    address : str, optional
        A cluster to join if this process has not joined a Ray yet: ``"host:port"`` of the
        head's GCS, ``"auto"``, or a ``"ray://"`` client address. ``RAY_ADDRESS`` by default.
    num_cpus : int, optional
        CPUs of a local Ray started by the adapter (all by default). Ignored when a cluster is
        used (its nodes declare their own CPUs; ``ray.init`` refuses ``num_cpus`` when
        joining one), as ``executor="dask"`` ignores ``workers=`` for an existing client.
    max_in_flight : int, optional
        Tasks submitted at once (by default twice the cluster's CPUs, counted again every
        second during a run, so nodes that join get tasks).

    Notes
    -----
    Ray's own retries are switched off (``max_retries=0``): the library retries failed regions
    itself, on a fresh fork, so a task is never run twice for one attempt. A task lost with its
    worker or its node fails with Ray's error (``WorkerCrashedError``, ``NodeDiedError``...),
    and is retried like any failed task.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        ray = import_engine("ray", "ray")
        self._started = False  # this adapter called ray.init: close() calls ray.shutdown
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address is not None:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            self._started = True
        self._max_in_flight = max_in_flight
        self._cpus = _count_cpus(ray)

    @property
    def _in_flight(self) -> int:
        return self._max_in_flight or IN_FLIGHT_PER_WORKER * self._cpus

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; one per CPU runs at once.

        The user's own modules travel by value (:mod:`~icechunk_distributed.shipping`),
        even to a local Ray this process started: its workers put only this process's
        working and script directories on their ``sys.path``, not directories added at run
        time (a notebook's ``sys.path.insert``), and a cluster's nodes have neither.
        """
        return Capabilities(
            crosses_processes=True,
            parallelism=self._cpus,
            supports_backups=True,
            shares_modules=False,
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Submit up to ``max_in_flight`` tasks; yield each result as ``ray.wait`` returns it.

        Without ``max_in_flight``, the bound follows the cluster's CPUs, counted again every
        second: nodes that join during the run get tasks.
        """
        ray = import_engine("ray", "ray")
        if not inspect.isfunction(fn):  # ray.remote takes functions only (not a partial)
            fn = _as_function(fn)
        remote = ray.remote(fn).options(max_retries=0, retry_exceptions=False)
        feed = ItemFeed(items)
        pending: dict[Any, Any] = {}
        counted = time.monotonic()
        try:
            while True:
                if time.monotonic() - counted >= _RECOUNT:
                    # Nodes join and leave (autoscaling, preemption); keep the last count if
                    # the head does not answer.
                    with contextlib.suppress(Exception):
                        self._cpus = _count_cpus(ray)
                    counted = time.monotonic()
                while len(pending) < self._in_flight and (item := feed.pull()) is not None:
                    key, arg = item
                    pending[remote.remote(arg)] = key
                if not pending:
                    return
                wait = _RECOUNT if poll is None else min(poll, _RECOUNT)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
                for ref in ready:
                    key = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # a worker crashed, the object was lost, ...
                        yield key, exc
                    else:
                        yield key, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)  # kills the worker of a task still running

    def close(self) -> None:
        """Leave the Ray this adapter joined or started (``ray.shutdown``).

        A local Ray stops; a cluster keeps running. A Ray the caller initialised is left alone.
        """
        if self._started:
            import_engine("ray", "ray").shutdown()
            self._started = False


def _count_cpus(ray: Any) -> int:
    """The CPUs of the cluster's live nodes (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _as_function(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` (a partial, say) as a plain function, named after what it calls."""

    def call(arg: Any) -> Any:
        return fn(arg)

    inner = getattr(fn, "func", fn)
    call.__name__ = call.__qualname__ = getattr(inner, "__name__", "task")
    return call
