"""What every adapter builds on: the :class:`Adapter` interface and its :class:`Capabilities`.

An adapter turns ``(key, arg)`` items into ``(key, result)`` pairs in completion order; the
run loop (:class:`~icechunk_distributed.runner.TaskLoop`) does everything else. Everything
here is public: a new adapter needs nothing more (``docs/runner.md`` has an example).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IN_FLIGHT_PER_WORKER",
    "Adapter",
    "Capabilities",
    "ItemFeed",
    "Outcome",
    "import_engine",
]

IN_FLIGHT_PER_WORKER = 2
"""Calls an adapter keeps submitted per worker slot: one running, one queued behind it, so a
worker never waits for the loop to build its next argument, and few enough that arguments
are built (and snapshots forked) just in time."""

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
    per_call_overhead : float
        Rough seconds of overhead per call; above zero, the loop batches tasks into fewer calls.
    max_arg_bytes : int or None
        Largest pickled call argument the engine accepts (Lithops' ``data_limit``).
    supports_backups : bool
        :meth:`Adapter.map_unordered` takes ``poll`` and the ``None`` items that come with it,
        and allows one key in flight twice: the loop may then run backup copies of straggling
        tasks (:class:`~icechunk_distributed.runner.Backups`).
    shares_modules : bool
        The workers import what this process imports from its own ``sys.path`` (they run
        on this machine and were started from this process: pools, a ``LocalCluster``).
        If False (cluster nodes, serverless functions), the user's own modules travel by
        value inside each task (:mod:`~icechunk_distributed.shipping`).
    """

    crosses_processes: bool
    parallelism: int
    per_call_overhead: float = 0.0
    max_arg_bytes: int | None = None
    supports_backups: bool = False
    shares_modules: bool = True


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
