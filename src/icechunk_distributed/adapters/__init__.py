"""Executor adapters: each turns ``(fn, item)`` pairs into results, in completion order.

The run loop in :mod:`icechunk_distributed.runner` owns retries, progress and merging; an
adapter only runs a function over items and says, through explicit capability flags, what
its engine needs (pickling across processes, batching, ...). The interface is in
:mod:`~icechunk_distributed.adapters.base`; engines are imported lazily, by name.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from icechunk_distributed.adapters.base import (
    IN_FLIGHT_PER_WORKER,
    Adapter,
    Capabilities,
    ItemFeed,
    Outcome,
    import_engine,
)

__all__ = [
    "IN_FLIGHT_PER_WORKER",
    "Adapter",
    "Capabilities",
    "ItemFeed",
    "Outcome",
    "get_adapter",
    "import_engine",
    "known_executors",
    "open_adapter",
]


def known_executors() -> list[str]:
    """Names accepted by ``executor=``."""
    return ["serial", "threads", "processes", "joblib", "ray", "lithops", "dask", "beam"]


def get_adapter(executor: Any, *, workers: int | None = None) -> Adapter:
    """Resolve ``executor=`` (a name, an adapter, or an engine object) into an adapter.

    Parameters
    ----------
    executor : str, Adapter or engine object
        ``"serial"``, ``"threads"``, ``"processes"``, ``"joblib"``, ``"ray"``, ``"lithops"``,
        ``"dask"``, ``"beam"``; an :class:`Adapter`; the ``ray`` module, a
        ``distributed.Client``, a ``lithops.FunctionExecutor``, an ``apache_beam.Pipeline``
        or ``PipelineOptions``; or any ``concurrent.futures.Executor``
        (``client.get_executor()``, loky's reusable executor, ``MPIPoolExecutor``, ...).
    workers : int, optional
        Pool size for executors the library starts itself.

    Returns
    -------
    Adapter
        The adapter; close it when done (it only shuts down what it started).
    """
    # beam: stdlib only, so this imports no apache_beam
    from icechunk_distributed.adapters import beam, local

    if isinstance(executor, Adapter):
        return executor
    if isinstance(executor, str):
        name = executor.lower()
        if name == "serial":
            return local.SerialAdapter()
        if name == "threads":
            return local.FuturesAdapter.threads(workers)
        if name == "processes":
            return local.FuturesAdapter.processes(workers)
        if name == "joblib":
            from icechunk_distributed.adapters.joblib import JoblibAdapter

            return JoblibAdapter(n_jobs=workers)
        if name == "ray":
            from icechunk_distributed.adapters.ray import RayAdapter

            return RayAdapter(num_cpus=workers)
        if name == "lithops":
            from icechunk_distributed.adapters.lithops import LithopsAdapter

            return LithopsAdapter(workers=workers)
        if name == "dask":
            from icechunk_distributed.adapters.dask import DaskAdapter

            return DaskAdapter(workers=workers)
        if name == "beam":
            return beam.BeamAdapter(workers=workers)
        raise ValueError(
            f"unknown executor {executor!r}; known names: {', '.join(known_executors())}. "
            "You can also pass a concurrent.futures Executor instance."
        )
    # Engine objects, recognised without importing their engines.
    module = getattr(type(executor), "__module__", "") or ""
    if isinstance(executor, types.ModuleType) and executor.__name__ == "ray":
        from icechunk_distributed.adapters.ray import RayAdapter

        return RayAdapter()
    if module.startswith("distributed") and type(executor).__name__ == "Client":
        from icechunk_distributed.adapters.dask import DaskAdapter

        return DaskAdapter(executor)
    if module.startswith("lithops") and hasattr(executor, "map") and hasattr(executor, "wait"):
        from icechunk_distributed.adapters.lithops import LithopsAdapter

        return LithopsAdapter(executor, workers=workers)
    if beam.is_beam_object(executor):
        return beam.BeamAdapter.from_object(executor, workers=workers)
    if isinstance(executor, Executor):
        return local.FuturesAdapter(executor)
    raise TypeError(
        f"cannot use {type(executor).__name__!r} as an executor: pass one of "
        f"{known_executors()}, a distributed.Client, a lithops.FunctionExecutor, the ray "
        "module, an apache_beam Pipeline or PipelineOptions, a concurrent.futures.Executor, "
        "or an Adapter"
    )


@contextlib.contextmanager
def open_adapter(executor: Any, *, workers: int | None = None) -> Iterator[Adapter]:
    """:func:`get_adapter` as a context manager: closes the adapter if it made it.

    Parameters
    ----------
    executor : str, Adapter or engine object
        As for :func:`get_adapter`.
    workers : int, optional
        Pool size for executors the library starts itself.

    Yields
    ------
    Adapter
        The adapter (the caller's own, or one started here and closed on exit).
    """
    adapter = get_adapter(executor, workers=workers)
    try:
        yield adapter
    finally:
        if adapter is not executor:
            adapter.close()
