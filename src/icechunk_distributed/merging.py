"""Task results merged into the session in batches, as they arrive.

One :func:`~icechunk_distributed.session.merge_sessions` call has a fixed cost (the base's
lineage, the registry, the lock, icechunk's own merge call) that dwarfs the per-chunk work
of a one-chunk task; merging results a batch at a time pays it once per batch. A batch is
merged when it is full, when its oldest result has waited :data:`MERGE_DELAY` seconds (checked
as results arrive), and at the end of the run; a result arriving :data:`MERGE_DELAY` or more
after the one before is merged at once (slow tasks are merged one by one, as before). So a
result waits only while others keep arriving, or, at most, for the next arrival after a
burst.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from icechunk_distributed.session import DistributedSession, SessionSnapshot, merge_sessions

__all__ = ["MERGE_BATCH", "MERGE_DELAY", "ResultMerger"]

MERGE_BATCH = 64
"""Results merged in one call at most."""

MERGE_DELAY = 0.2
"""Seconds a result may wait for others to share its merge (checked as results arrive)."""


class ResultMerger:
    """Merges task snapshots into ``session`` in batches; call :meth:`flush` at the end.

    Parameters
    ----------
    session : DistributedSession
        Where the results go.
    after_merge : callable, optional
        ``after_merge(i)`` for each region ``i``, once its result is merged.
    lock : context manager, optional
        Held while merging (a checkpoint thread commits the session in between).
    max_batch : int, optional
        Results per merge at most (default :data:`MERGE_BATCH`).
    max_delay : float
        Seconds the oldest waiting result may wait for the next arrival.
    """

    def __init__(
        self,
        session: DistributedSession,
        *,
        after_merge: Callable[[int], None] | None = None,
        lock: contextlib.AbstractContextManager[Any] | None = None,
        max_batch: int | None = None,
        max_delay: float = MERGE_DELAY,
    ) -> None:
        self.session, self.after_merge = session, after_merge
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.max_batch, self.max_delay = max_batch or MERGE_BATCH, max_delay
        self.n_merges = 0
        self._indices: list[int] = []
        self._snapshots: list[SessionSnapshot] = []
        self._since = self._last = 0.0
        self._pending = threading.Lock()  # the lists; taken inside `lock`, never around it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.error: BaseException | None = None

    def add(self, index: int, snapshot: SessionSnapshot) -> None:
        """Region ``index``'s result; merged now if the batch is due."""
        if self.error is not None:
            raise self.error  # the watcher's merge failed: the run ends as it would have
        now = time.monotonic()
        with self._pending:
            # Results arriving further apart than max_delay are merged at once: waiting for
            # the next one would hold them back for a whole task's time.
            sparse = now - self._last >= self.max_delay
            self._last = now
            if not self._indices:
                self._since = now
            self._indices.append(index)
            # The tasks of one call share a snapshot (task.run_call): held once.
            if not self._snapshots or self._snapshots[-1] is not snapshot:
                self._snapshots.append(snapshot)
            n = len(self._indices)
        if sparse or n >= self.max_batch or now - self._since >= self.max_delay:
            self.flush()

    def flush(self) -> None:
        """Merge what waits (all or nothing: a refused merge merges none of the batch).

        Raises what a merge by the watcher raised, if one failed.
        """
        watcher = threading.current_thread() is self._watcher
        with self.lock:
            # Checked under the lock: the watcher records its failure before releasing it.
            if self.error is not None and not watcher:
                raise self.error
            with self._pending:
                indices, snapshots = self._indices, self._snapshots
                self._indices, self._snapshots = [], []
            if not indices:
                return
            try:
                merge_sessions(self.session, *snapshots)
                self.n_merges += 1
                if self.after_merge is not None:
                    for i in indices:
                        self.after_merge(i)
            except BaseException as exc:
                if watcher:
                    self.error = exc
                raise

    def __enter__(self) -> ResultMerger:
        """With ``after_merge`` (a run that checkpoints), watch for results left waiting.

        After a burst, the last results would otherwise wait for the next arrival, which may
        be a whole task away: a checkpoint would miss them meanwhile.
        """
        if self.after_merge is not None:
            self._watcher = threading.Thread(target=self._watch, name="merges", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.error is not None and exc[0] is None:
            raise self.error  # nothing may end normally after a refused merge

    def _watch(self) -> None:
        while not self._stop.wait(self.max_delay):
            with self._pending:
                due = bool(self._indices) and time.monotonic() - self._since >= self.max_delay
            if due:
                try:
                    self.flush()
                except BaseException:  # recorded by flush: the next add() or flush() raises it
                    return
