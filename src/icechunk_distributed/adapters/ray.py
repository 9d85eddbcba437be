"""Ray: tasks as Ray remote functions, results in completion order (``ray.wait``)."""

from __future__ import annotations

import os
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


class RayAdapter(Adapter):
    """Run tasks on Ray: the cluster already initialised, or a local one started (and stopped).

    Parameters
    ----------
    num_cpus : int, optional
        CPUs of a local Ray started by the adapter (all by default).
    max_in_flight : int, optional
        Tasks submitted at once (twice the cluster's CPUs by default).

    Notes
    -----
    Ray's own retries are switched off (``max_retries=0``): the library retries failed regions
    itself, on a fresh fork, so a task is never run twice for one attempt.
    """

    name = "ray"

    def __init__(self, *, num_cpus: int | None = None, max_in_flight: int | None = None) -> None:
        ray = import_engine("ray", "ray")
        self._started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            self._started = True
        self._cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._max_in_flight = max_in_flight or IN_FLIGHT_PER_WORKER * self._cpus

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; one per CPU runs at once."""
        return Capabilities(crosses_processes=True, parallelism=self._cpus, supports_backups=True)

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Submit up to ``max_in_flight`` tasks; yield each result as ``ray.wait`` returns it."""
        ray = import_engine("ray", "ray")
        remote = ray.remote(fn).options(max_retries=0, retry_exceptions=False)
        feed = ItemFeed(items)
        pending: dict[Any, Any] = {}
        try:
            while True:
                while len(pending) < self._max_in_flight and (item := feed.pull()) is not None:
                    key, arg = item
                    pending[remote.remote(arg)] = key
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
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
        """Shut Ray down if this adapter started it."""
        if self._started:
            import_engine("ray", "ray").shutdown()
            self._started = False
