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
    max_batch : int
        Results per merge at most.
    max_delay : float
        Seconds the oldest waiting result may wait for the next arrival.
    """

    def __init__(
        self,
        session: DistributedSession,
        *,
        after_merge: Callable[[int], None] | None = None,
        lock: contextlib.AbstractContextManager[Any] | None = None,
        max_batch: int = MERGE_BATCH,
        max_delay: float = MERGE_DELAY,
    ) -> None:
        self.session, self.after_merge = session, after_merge
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.max_batch, self.max_delay = max_batch, max_delay
        self.n_merges = 0
        self._indices: list[int] = []
        self._snapshots: list[SessionSnapshot] = []
        self._since = self._last = 0.0

    def add(self, index: int, snapshot: SessionSnapshot) -> None:
        """Region ``index``'s result; merged now if the batch is due."""
        now = time.monotonic()
        # Results arriving further apart than max_delay are merged at once: waiting for the
        # next one would hold them back for a whole task's time.
        sparse = now - self._last >= self.max_delay
        self._last = now
        if not self._indices:
            self._since = now
        self._indices.append(index)
        self._snapshots.append(snapshot)
        if sparse or len(self._indices) >= self.max_batch or now - self._since >= self.max_delay:
            self.flush()

    def flush(self) -> None:
        """Merge what waits (all or nothing: a refused merge merges none of the batch)."""
        if not self._indices:
            return
        indices, snapshots = self._indices, self._snapshots
        self._indices, self._snapshots = [], []
        with self.lock:
            merge_sessions(self.session, *snapshots)
            self.n_merges += 1
            if self.after_merge is not None:
                for i in indices:
                    self.after_merge(i)
