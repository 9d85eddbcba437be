"""Executor adapters: each turns ``(fn, item)`` pairs into results, in completion order.

The generic loop in :mod:`icechunk_distributed.runner` owns retries, progress and merging; an
adapter only runs a function over items and says, through explicit capability flags, what
its engine needs (pickling across processes, batching, ...). Engines are imported lazily.
"""

from __future__ import annotations

import abc
import importlib
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Adapter",
    "Capabilities",
    "ItemFeed",
    "Outcome",
    "get_adapter",
    "import_engine",
    "known_executors",
]

Outcome = tuple[Any, Any]
"""``(key, result)``; ``result`` is a :class:`BaseException` when the engine itself failed."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine needs and offers; the generic loop reads these, never the engine type.

    Attributes
    ----------
    crosses_processes : bool
        Task arguments and results are pickled (the source must be picklable).
    parallelism : int
        How many tasks run at once (sizes the default task plan and tasks in flight).
    supports_cancel : bool
        Queued tasks can be cancelled on failure or interrupt.
    per_call_overhead : float
        Rough seconds of overhead per call; above zero, the loop batches tasks into fewer calls.
    max_arg_bytes : int or None
        Largest pickled call argument the engine accepts (Lithops' ``data_limit``).
    supports_backups : bool
        :meth:`Adapter.map_unordered` takes ``poll`` and the ``None`` items that come with it,
        and allows one key in flight twice: the loop may then run backup copies of straggling
        tasks (:class:`~icechunk_distributed.runner.Backups`).
    """

    crosses_processes: bool
    parallelism: int
    supports_cancel: bool = True
    per_call_overhead: float = 0.0
    max_arg_bytes: int | None = None
    supports_backups: bool = False


class ItemFeed:
    """Pulls ``(key, arg)`` items for :meth:`Adapter.map_unordered`, one at a time.

    :meth:`pull` returns the next item, or ``None`` when there is nothing to submit now: the
    items said so (``None``, see ``poll``), or they are used up (then :attr:`exhausted`).
    Items are built by the loop only when pulled, so pull only when a slot is free.
    """

    __slots__ = ("_items", "exhausted")

    def __init__(self, items: Iterable[tuple[Any, Any] | None]) -> None:
        self._items = iter(items)
        self.exhausted = False

    def pull(self) -> tuple[Any, Any] | None:
        """The next item, or ``None`` for "nothing now" (or never: :attr:`exhausted`)."""
        if self.exhausted:
            return None
        try:
            return next(self._items)
        except StopIteration:
            self.exhausted = True
            return None


class Adapter(abc.ABC):
    """One executor behind the submit -> gather interface of the generic loop."""

    name: str = "adapter"

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """The engine's capability flags."""

    @abc.abstractmethod
    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[tuple[Any, Any] | None],
        *,
        poll: float | None = None,
    ) -> Iterator[Outcome]:
        """Run ``fn(arg)`` for every ``(key, arg)``; yield ``(key, result)`` as each finishes.

        ``items`` is consumed lazily, so arguments are built only when a slot frees up.
        Closing the generator cancels what has not started.

        ``poll`` is only passed to adapters that declare ``supports_backups``. Then ``items``
        may yield ``None``, only while some item is still in flight, meaning "nothing to
        submit right now": stop pulling, wait up to ``poll`` seconds for a completion, yield
        what completed, then pull again. A key may then be in flight twice (a backup copy).
        Without ``poll``, ``items`` holds no ``None``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the adapter started (never what the caller passed in)."""

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def import_engine(module: str, extra: str) -> Any:
    """Import an engine lazily; if it is missing, say which extra installs it.

    Parameters
    ----------
    module : str
        The engine's module (``"ray"``, ``"distributed"``, ...).
    extra : str
        The ``icechunk-distributed`` extra that installs it.

    Returns
    -------
    module
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"executor={extra!r} needs {module}: pip install 'icechunk-distributed[{extra}]'"
        ) from exc


def known_executors() -> list[str]:
    """Names accepted by ``executor=``."""
    return ["serial", "threads", "processes", "joblib", "ray", "lithops", "dask"]


def get_adapter(executor: Any, *, workers: int | None = None) -> Adapter:
    """Resolve ``executor=`` (a name, an adapter, or an engine object) into an adapter.

    Parameters
    ----------
    executor : str, Adapter or engine object
        ``"serial"``, ``"threads"``, ``"processes"``, ``"joblib"``, ``"ray"``, ``"lithops"``,
        ``"dask"``; an :class:`Adapter`; the ``ray`` module, a ``distributed.Client``, a
        ``lithops.FunctionExecutor``; or any ``concurrent.futures.Executor``
        (``client.get_executor()``, loky's reusable executor, ``MPIPoolExecutor``, ...).
    workers : int, optional
        Pool size for executors the library starts itself.

    Returns
    -------
    Adapter
        The adapter; close it when done (it only shuts down what it started).
    """
    from icechunk_distributed.adapters import local

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
    if isinstance(executor, Executor):
        return local.FuturesAdapter(executor)
    raise TypeError(
        f"cannot use {type(executor).__name__!r} as an executor: pass one of "
        f"{known_executors()}, a distributed.Client, a lithops.FunctionExecutor, the ray "
        "module, a concurrent.futures.Executor, or an Adapter"
    )
