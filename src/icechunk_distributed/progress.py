"""Progress reports: the events the run loop emits and the observers that receive them.

The loop knows one interface, :class:`ProgressObserver` (``on_event`` and ``close``). A
``progress=`` argument becomes a list of observers here: a tqdm bar, the caller's callback,
or both; nothing else in the package looks at ``progress=``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "CallbackObserver",
    "EventKind",
    "Progress",
    "ProgressBar",
    "ProgressEvent",
    "ProgressObserver",
    "observers_for",
    "observing",
]

EventKind = Literal["done", "retry", "failed", "backup"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run, passed to ``progress=`` callbacks.

    Attributes
    ----------
    kind : {"done", "retry", "failed", "backup"}
        A task finished; a task failed and will be retried; a task failed for good; a backup
        copy of a straggling task was launched (see :class:`~icechunk_distributed.Backups`).
    index : int
        The task (region) index.
    attempt : int
        Attempts launched for the task so far, backups included (1 for the first).
    n_done, n_failed, n_total : int
        Tasks finished, failed for good, and in all.
    error : str or None
        The failure, for ``retry`` and ``failed``.
    """

    kind: EventKind
    index: int
    attempt: int
    n_done: int
    n_failed: int
    n_total: int
    error: str | None = None


Progress = bool | Callable[[ProgressEvent], None] | None
"""What ``progress=`` accepts: a bar or not (``None``: when stderr is a terminal), or a
callback."""


class ProgressObserver(Protocol):
    """Receives a run's events; closed once when the run ends, however it ends."""

    def on_event(self, event: ProgressEvent) -> None:
        """One event, in the order the loop saw it."""

    def close(self) -> None:
        """The run is over."""


class CallbackObserver:
    """Passes every event to a ``progress=`` callback."""

    def __init__(self, callback: Callable[[ProgressEvent], None]) -> None:
        self.callback = callback

    def on_event(self, event: ProgressEvent) -> None:
        """Call the callback."""
        self.callback(event)

    def close(self) -> None:
        """Nothing to release."""


class ProgressBar:
    """A tqdm bar of regions done, with retries, failures and backups as its postfix."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar: Any = tqdm(total=total, desc="regions", unit="region")
        self.n_backups = 0

    def on_event(self, event: ProgressEvent) -> None:
        """Advance the bar or update its postfix."""
        if event.kind == "done":
            self.bar.update(1)
        elif event.kind in ("retry", "failed"):
            self.bar.set_postfix(retries=event.attempt, failed=event.n_failed, refresh=False)
        elif event.kind == "backup":
            self.n_backups += 1
            self.bar.set_postfix(backups=self.n_backups, refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def observers_for(progress: Progress, total: int) -> Sequence[ProgressObserver]:
    """The observers a ``progress=`` argument asks for, for a run of ``total`` tasks.

    Parameters
    ----------
    progress : bool, callable or None
        ``True``: a bar; ``None``: a bar when stderr is a terminal; a callable: the callback.
    total : int
        Tasks in the run.

    Returns
    -------
    list of ProgressObserver
        Possibly empty.
    """
    observers: list[ProgressObserver] = []
    if progress is True or (progress is None and sys.stderr.isatty()):
        with contextlib.suppress(ImportError):  # pragma: no cover - tqdm is a dependency
            observers.append(ProgressBar(total))
    if callable(progress) and not isinstance(progress, bool):
        observers.append(CallbackObserver(progress))
    return observers


@contextlib.contextmanager
def observing(progress: Progress, total: int) -> Iterator[list[ProgressObserver]]:
    """:func:`observers_for`, closed when the block ends, however it ends.

    Parameters
    ----------
    progress : bool, callable or None
        As for :func:`observers_for`.
    total : int
        Tasks in the run.

    Yields
    ------
    list of ProgressObserver
        The observers to give the run loop.
    """
    observers = list(observers_for(progress, total))
    try:
        yield observers
    finally:
        for observer in observers:
            observer.close()
