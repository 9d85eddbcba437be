"""Dask distributed: tasks as ``Client.submit(..., pure=False)`` futures."""

from __future__ import annotations

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

__all__ = ["DaskAdapter"]


class DaskAdapter(Adapter):
    """Run tasks on a dask ``Client``: the one given, the current one, or a local cluster.

    Parameters
    ----------
    client : distributed.Client, optional
        The client. Without one, the current client (``get_client()``) is used, else a
        ``LocalCluster(processes=True)`` is started and closed afterwards.
    workers : int, optional
        Workers of a cluster started by the adapter.

    Notes
    -----
    Every submit is ``pure=False``: identical calls must not collapse into one. Dask's own
    retries are not used (the library retries on a fresh fork); dask may still re-run a task
    whose worker died, which is safe because a task's fork is only merged once it succeeded.
    """

    name = "dask"

    def __init__(self, client: Any = None, *, workers: int | None = None) -> None:
        distributed = import_engine("distributed", "dask")
        self._owned: list[Any] = []
        if client is None:
            try:
                client = distributed.get_client()
            except ValueError:
                cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
                )
                client = distributed.Client(cluster)
                self._owned = [client, cluster]
        self.client = client

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; one per worker thread runs at once."""
        threads = sum(self.client.nthreads().values()) or 1
        return Capabilities(crosses_processes=True, parallelism=threads, supports_backups=True)

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Submit with bounded tasks in flight; yield as ``as_completed`` returns them."""
        distributed = import_engine("distributed", "dask")
        limit = IN_FLIGHT_PER_WORKER * self.capabilities.parallelism
        feed = ItemFeed(items)
        keys: dict[Any, Any] = {}
        # The client's own loop: the client need not be the default one.
        queue = distributed.as_completed(loop=self.client.loop)

        def top_up() -> None:
            while len(keys) < limit and (item := feed.pull()) is not None:
                key, arg = item
                future = self.client.submit(fn, arg, pure=False)
                keys[future] = key
                queue.add(future)

        def completed() -> list[Any]:
            if poll is None:
                return [next(queue)]
            # Sleep until a completion is queued (as_completed notifies this condition for
            # each one) or `poll` seconds pass.
            with queue.thread_condition:
                queue.thread_condition.wait_for(queue.has_ready, timeout=poll)
            return list(queue.next_batch(block=False))

        try:
            top_up()
            while keys:
                for future in completed():
                    key = keys.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # the task raised or its worker was lost for good
                        yield key, exc
                    else:
                        yield key, result
                    finally:
                        future.release()
                top_up()
        finally:
            for future in keys:
                future.cancel()

    def close(self) -> None:
        """Close the client and cluster if this adapter started them."""
        for thing in self._owned:
            thing.close()
        self._owned = []
