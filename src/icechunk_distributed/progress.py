"""Progress reports: the events the run loop emits and the observers that receive them.

The loop knows one interface, :class:`ProgressObserver` (``on_event`` and ``close``). A
``progress=`` argument becomes a list of observers here: a tqdm bar, the caller's callback,
or both; nothing else in the package looks at ``progress=``.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
Stage = Literal["write", "scan"]

# What a bar calls its tasks, per stage.
_BAR_LABELS: dict[str, tuple[str, str]] = {"write": ("regions", "region"), "scan": ("scan", "file")}


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
    stage : {"write", "scan"}
        What the tasks do: write regions, or (for ``ingest``) read the files' headers.
    """

    kind: EventKind
    index: int
    attempt: int
    n_done: int
    n_failed: int
    n_total: int
    error: str | None = None
    stage: Stage = "write"


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
    """Passes every event to a ``progress=`` callback, marked with the run's stage."""

    def __init__(self, callback: Callable[[ProgressEvent], None], stage: Stage = "write") -> None:
        self.callback = callback
        self.stage = stage

    def on_event(self, event: ProgressEvent) -> None:
        """Call the callback."""
        if event.stage != self.stage:
            event = dataclasses.replace(event, stage=self.stage)
        self.callback(event)

    def close(self) -> None:
        """Nothing to release."""


class ProgressBar:
    """A tqdm bar of regions done, with retries, failures and backups as its postfix."""

    def __init__(self, total: int, stage: Stage = "write") -> None:
        from tqdm.auto import tqdm

        desc, unit = _BAR_LABELS[stage]
        self.bar: Any = tqdm(total=total, desc=desc, unit=unit)
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


def observers_for(
    progress: Progress, total: int, stage: Stage = "write"
) -> Sequence[ProgressObserver]:
    """The observers a ``progress=`` argument asks for, for a run of ``total`` tasks.

    Parameters
    ----------
    progress : bool, callable or None
        ``True``: a bar; ``None``: a bar when stderr is a terminal; a callable: the callback.
    total : int
        Tasks in the run.
    stage : {"write", "scan"}
        What the tasks do (the bar's label; the events' ``stage``).

    Returns
    -------
    list of ProgressObserver
        Possibly empty.
    """
    observers: list[ProgressObserver] = []
    if progress is True or (progress is None and sys.stderr.isatty()):
        with contextlib.suppress(ImportError):  # pragma: no cover - tqdm is a dependency
            observers.append(ProgressBar(total, stage))
    if callable(progress) and not isinstance(progress, bool):
        observers.append(CallbackObserver(progress, stage))
    return observers


@contextlib.contextmanager
def observing(
    progress: Progress, total: int, stage: Stage = "write"
) -> Iterator[list[ProgressObserver]]:
    """:func:`observers_for`, closed when the block ends, however it ends.

    Parameters
    ----------
    progress : bool, callable or None
        As for :func:`observers_for`.
    total : int
        Tasks in the run.
    stage : {"write", "scan"}
        As for :func:`observers_for`.

    Yields
    ------
    list of ProgressObserver
        The observers to give the run loop.
    """
    observers = list(observers_for(progress, total, stage))
    try:
        yield observers
    finally:
        for observer in observers:
            observer.close()
