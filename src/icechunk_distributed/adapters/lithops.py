"""Lithops: serverless functions (or its localhost backend), with regions batched per call."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from icechunk_distributed.adapters import Adapter, Capabilities, Outcome, import_engine

__all__ = ["LithopsAdapter", "localhost_config"]

DATA_LIMIT_MIB = 4
"""Lithops refuses call arguments over this many MiB unless ``data_limit`` is raised."""


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
            executor = lithops.FunctionExecutor(config=config, log_level=None)
            workers = workers or config.get("localhost", {}).get("worker_processes")
            workers = workers or os.cpu_count() or 1
        self.executor = executor
        self._workers = workers or getattr(executor, "config", {}).get("lithops", {}).get(
            "max_workers", 8
        )
        limit = getattr(executor, "config", {}).get("lithops", {}).get("data_limit", DATA_LIMIT_MIB)
        self.data_limit = int(limit * 2**20) if limit else None
        self.n_calls = 0  # Lithops calls made, for the record (each costs ~0.4 s or more)

    @property
    def capabilities(self) -> Capabilities:
        """Tasks cross processes; calls are expensive, so regions are batched."""
        return Capabilities(
            crosses_processes=True,
            parallelism=int(self._workers),
            supports_cancel=False,
            per_call_overhead=0.4,
            max_arg_bytes=self.data_limit,
        )

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[tuple[Any, Any]]
    ) -> Iterator[Outcome]:
        """Submit every call of the round at once; yield results as calls finish."""
        import cloudpickle
        from lithops.wait import ANY_COMPLETED

        batch = list(items)
        if not batch:
            return
        keys = [k for k, _ in batch]
        args = [cloudpickle.dumps((fn, a)) for _, a in batch]
        futures = self.executor.map(_call, args, include_modules=[])
        self.n_calls += len(args)
        index = {id(f): k for f, k in zip(futures, keys, strict=True)}
        pending = list(futures)
        while pending:
            done, pending = self.executor.wait(
                pending,
                throw_except=False,
                return_when=ANY_COMPLETED,
                show_progressbar=False,
            )
            for future in done:
                key = index[id(future)]
                try:
                    yield key, future.result(throw_except=True)
                except Exception as exc:  # the function or its runner process failed
                    yield key, exc

    def close(self) -> None:
        """Clean up the executor if the adapter made it."""
        if self._owned:
            with contextlib.suppress(Exception):  # best effort: temporary files only
                self.executor.clean()
