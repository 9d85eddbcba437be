"""Dask distributed: tasks as ``Client.submit(..., pure=False)`` futures."""

from __future__ import annotations

import contextlib
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

__all__ = ["DaskAdapter"]

_RECOUNT = 1.0
"""Seconds between looks at the client and its workers while waiting for completions."""


class DaskAdapter(Adapter):
    """Run tasks on a dask ``Client``: given, current, configured, or a local cluster's.

    Which client, in order:

    1. ``client``, as given (its scheduler may be anywhere);
    2. else a new client to the scheduler at ``address``;
    3. else the current client (``distributed.get_client()``: the last ``Client(...)``
       made, or the worker's own when called inside a task);
    4. else a new client to the scheduler in dask's config (``scheduler-address``, i.e.
       ``DASK_SCHEDULER_ADDRESS``), as ``Client()`` itself would connect;
    5. else a ``LocalCluster(processes=True)`` of ``workers`` workers.

    Clients and clusters made here are closed by :meth:`close` (a scheduler joined through
    ``address`` keeps running); a client that was given or found is never closed.

    Parameters
    ----------
    client : distributed.Client, optional
        The client.
    address : str, optional
        A scheduler to connect to (``"tcp://host:8786"``) when no client is given.
    workers : int, optional
        Workers of a cluster started by the adapter; ignored for any other client (the
        cluster's workers are what they are).

    Notes
    -----
    Every submit is ``pure=False``: identical calls must not collapse into one. Dask's own
    retries are not used (the library retries on a fresh fork); dask may still re-run a task
    whose worker died, which is safe because a task's fork is only merged once it succeeded.
    """

    name = "dask"

    def __init__(
        self, client: Any = None, *, address: str | None = None, workers: int | None = None
    ) -> None:
        distributed = import_engine("distributed", "dask")
        self._owned: list[Any] = []
        if client is None and address is None:
            try:
                client = distributed.get_client()
            except ValueError:
                import dask.config

                address = dask.config.get("scheduler-address", None) or None
                if address is None:
                    cluster = distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",
                    )
                    client = distributed.Client(cluster)
                    self._owned = [client, cluster]
        if client is None:
            client = distributed.Client(address, set_as_default=False)
            self._owned = [client]
        self.client = client
        self._address = getattr(client.scheduler, "address", None) or address
        # A LocalCluster of this process: its workers were spawned from here and import what
        # this process imports. Any other scheduler's workers may run anywhere.
        self._local = isinstance(getattr(client, "cluster", None), distributed.LocalCluster)

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; one per worker thread runs at once.

        The workers of a ``LocalCluster`` of this process import what it imports; those of
        any other scheduler get the user's own modules by value
        (:mod:`~icechunk_distributed.shipping`).
        """
        try:
            threads = sum(self.client.nthreads().values()) or 1
        except Exception as exc:
            if self._usable():
                raise
            raise self._scheduler_lost() from exc
        return Capabilities(
            crosses_processes=True,
            parallelism=threads,
            supports_backups=True,
            shares_modules=self._local,
        )

    def _usable(self) -> bool:
        """Whether the client can still run tasks: connected, or reconnecting.

        A client that lost its scheduler tries to reconnect for
        ``distributed.comm.timeouts.connect`` (30 s by default), then closes itself.
        """
        return self.client.status not in ("closing", "closed")

    def _scheduler_lost(self) -> ConnectionError:
        return ConnectionError(
            f"the dask scheduler at {self._address} is lost: the client did not reconnect "
            f"(client status {self.client.status!r}) and runs nothing more. Start a "
            "scheduler and call again (with the same run_id= to keep the regions written)."
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Submit with bounded tasks in flight; yield as ``as_completed`` returns them.

        Tasks lost with the scheduler fail with dask's ``FutureCancelledError``
        (``scheduler-connection-lost``); once the client gives up reconnecting, this raises
        ``ConnectionError`` (the run loop counts a failed attempt for the tasks in flight)
        instead of waiting for futures that will never finish.
        """
        distributed = import_engine("distributed", "dask")
        if not self._usable():
            raise self._scheduler_lost()
        feed = ItemFeed(items)
        keys: dict[Any, Any] = {}
        # The client's own loop: the client need not be the default one.
        queue = distributed.as_completed(loop=self.client.loop)
        # Tasks in flight follow the worker threads there are now, counted again every
        # second: an adaptive cluster (dask-jobqueue, Kubernetes) may start with no worker.
        limit, counted = IN_FLIGHT_PER_WORKER * self.capabilities.parallelism, time.monotonic()

        def top_up() -> None:
            nonlocal limit, counted
            if time.monotonic() - counted >= _RECOUNT:
                limit = IN_FLIGHT_PER_WORKER * self.capabilities.parallelism
                counted = time.monotonic()
            while len(keys) < limit and (item := feed.pull()) is not None:
                if not self._usable():  # a future of a closing client never finishes
                    raise self._scheduler_lost()
                key, arg = item
                future = self.client.submit(fn, arg, pure=False)
                keys[future] = key
                queue.add(future)

        def completed() -> list[Any]:
            # Sleep until a completion is queued (as_completed notifies this condition for
            # each one), `poll` seconds pass, or a second: then look at the client, and
            # (back in the loop) at the items and the workers, even if nothing completed.
            wait = _RECOUNT if poll is None else min(poll, _RECOUNT)
            with queue.thread_condition:
                queue.thread_condition.wait_for(queue.has_ready, timeout=wait)
            batch = list(queue.next_batch(block=False))
            if not batch and not self._usable():
                raise self._scheduler_lost()
            return batch

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
                with contextlib.suppress(Exception):  # a closed client: nothing to cancel
                    future.cancel()

    def close(self) -> None:
        """Close the client and cluster if this adapter started them."""
        for thing in self._owned:
            thing.close()
        self._owned = []
