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

NO_WORKERS_TIMEOUT = 120.0
"""Seconds a run waits, with tasks in flight, on a scheduler that had workers and has none
left (all lost, or a scheduler restarted in the client's reconnect window: workers do not
join a new scheduler) before it fails with ``ConnectionError``. A cluster that starts with
no workers (adaptive, queued batch jobs) is waited for without limit until it has some."""


class DaskAdapter(Adapter):
    """Run tasks on a dask ``Client``: given, current, configured, or a local cluster's.

    Which client, in order:

    1. ``client``, as given (its scheduler may be anywhere);
    2. else a new client to the scheduler at ``address``;
    3. else the current client (``distributed.get_client()``: the last ``Client(...)``
       made, or the worker's own when called inside a task);
    4. else a new client to the scheduler in dask's config (``scheduler-address``, i.e.
       ``DASK_SCHEDULER_ADDRESS``), as ``Client()`` itself would connect;
    5. else a ``LocalCluster(processes=True)`` of ``workers`` workers, listening (dashboard
       included) on 127.0.0.1 only.

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
        # Whether the workers import what this process imports: only for the LocalCluster
        # started below. A user's LocalCluster has the sys.path of when it started (not a
        # directory added since); any other scheduler's workers run anywhere.
        self._local = False
        if client is None and address is None:
            try:
                client = distributed.get_client()
            except ValueError:
                import dask.config

                address = dask.config.get("scheduler-address", None) or None
                if address is None:
                    # A throwaway cluster for this run: its scheduler, workers and
                    # dashboard listen on loopback only (a bare ":0" dashboard would
                    # listen on every interface of the user's machine).
                    cluster = distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address="127.0.0.1:0",
                    )
                    client = distributed.Client(cluster)
                    self._owned = [client, cluster]
                    # Its workers were spawned now, with this process's sys.path as it is.
                    self._local = True
        if client is None:
            client = distributed.Client(address, set_as_default=False)
            self._owned = [client]
        self.client = client
        self._address = getattr(client.scheduler, "address", None) or address

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; one per worker thread runs at once.

        The workers of the ``LocalCluster`` the adapter started import what this process
        imports; every other client's workers get the user's own modules by value
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

    def _check_idle(self, seen: list[float | None], waiting: int) -> None:
        """Raise if the client is lost, or its workers have been gone too long."""
        if not self._usable():
            raise self._scheduler_lost()
        if self._has_workers():
            seen[0] = time.monotonic()
        elif seen[0] is not None and time.monotonic() - seen[0] > NO_WORKERS_TIMEOUT:
            raise ConnectionError(
                f"the dask scheduler at {self._address} has had no workers for "
                f"{NO_WORKERS_TIMEOUT:.0f} s with {waiting} task(s) waiting (workers lost, "
                "or the scheduler restarted: workers do not join a new one). Start workers "
                "and call again (with the same run_id= to keep the regions written)."
            )

    def _has_workers(self) -> bool:
        with contextlib.suppress(Exception):  # a reconnecting client: judged by _usable
            return bool(self.client.nthreads())
        return True

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
            if not batch:
                self._check_idle(seen, len(keys))
            return batch

        seen = [time.monotonic() if self._has_workers() else None]  # workers last seen

        # Called from inside a dask task, the waiting task would hold its worker thread:
        # on a one-thread worker its own tasks could never start. Leave the thread pool
        # while waiting, as dask's worker_client does.
        seceded = _secede_if_in_task(distributed)
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
            if seceded:
                distributed.rejoin()

    def close(self) -> None:
        """Close the client and cluster if this adapter started them."""
        for thing in self._owned:
            thing.close()
        self._owned = []


def _secede_if_in_task(distributed: Any) -> bool:
    """Leave the worker's thread pool if this thread runs a dask task; whether it did."""
    if getattr(distributed.worker.thread_state, "key", None) is None:
        return False
    distributed.secede()
    return True
