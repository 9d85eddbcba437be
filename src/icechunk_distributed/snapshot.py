"""SessionSnapshot: the picklable stand-in for a writable session that tasks receive.

:func:`pickling_window` opens an ``allow_pickling()`` block and yields a snapshot; shipped to
a task, the snapshot's ``store`` is the task's own fork of the block's seed (see
:mod:`icechunk_distributed.coordinator`), and it travels home with the forks it wrote.
:func:`snapshot_target` and :func:`snapshot_items` give the merge what it needs from one.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from icechunk_distributed.coordinator import Coordinator, Seed
from icechunk_distributed.errors import SessionStateError
from icechunk_distributed.forks import Changes, Fork, claim_process
from icechunk_distributed.merge import Item, Ledger, Lineage, Target

if TYPE_CHECKING:
    from icechunk import ForkSession, IcechunkStore

__all__ = [
    "SessionSnapshot",
    "combine_snapshots",
    "pickling_window",
    "snapshot_items",
    "snapshot_target",
]


def _rebuild_snapshot(state: dict[str, Any]) -> SessionSnapshot:
    snap = SessionSnapshot.__new__(SessionSnapshot)
    lineage: Lineage = state["lineage"]
    snap._init(
        coordinator=None,
        seed=Seed(lineage, blob=state["seed"]),
        carried=[Fork(uid=u, seen=v, blob=b, changes=c) for u, v, b, c in state["forks"]],
    )
    return snap


class SessionSnapshot:
    """A picklable stand-in for a writable session, made by :func:`allow_pickling`.

    Ship it to tasks; in each task, write through :attr:`store` (a writable zarr store) and
    return the snapshot. Pass what the tasks return to :func:`merge_sessions`. Every thread
    that uses one snapshot object writes to its own fork, so sharing one between threads is
    safe too.

    Notes
    -----
    Do not create it directly: use :func:`allow_pickling` or
    :meth:`DistributedSession.allow_pickling`.
    """

    _coordinator: Coordinator | None
    _seed: Seed | None
    _live: dict[int, Fork]
    _carried: list[Fork]
    _ledger: Ledger | None  # made when the snapshot is a merge target (rarely)
    _lock: threading.Lock

    def __init__(self) -> None:
        raise TypeError("use allow_pickling(session) to make a SessionSnapshot")

    def _init(
        self, *, coordinator: Coordinator | None, seed: Seed | None, carried: list[Fork]
    ) -> None:
        self._coordinator = coordinator
        self._seed = seed
        self._live = {}
        self._carried = carried
        self._ledger = None
        self._lock = threading.Lock()

    @classmethod
    def _new(cls, coordinator: Coordinator) -> SessionSnapshot:
        snap = cls.__new__(cls)
        snap._init(coordinator=coordinator, seed=None, carried=[])
        return snap

    # -- the seed is made lazily, the first time the snapshot is shipped or written through:
    # every task of the block then starts from the session as it was at that moment.
    def _ensure_seed(self) -> Seed:
        with self._lock:
            if self._seed is None:
                assert self._coordinator is not None
                self._seed = self._coordinator.seed()
            return self._seed

    def _forget_seed(self) -> None:
        # A checkpoint moved the base: tasks built from now on fork the new one.
        with self._lock:
            self._seed = None

    @property
    def lineage(self) -> Lineage:
        """Where the snapshot comes from (session, branch, snapshot id, version)."""
        return self._ensure_seed().lineage

    def copy_for_task(self) -> SessionSnapshot:
        """A copy as a worker receives it: the same seed, no forks yet.

        In this process it forks the seed directly, without a pickle round trip.
        """
        snap = SessionSnapshot.__new__(SessionSnapshot)
        snap._init(coordinator=None, seed=self._ensure_seed(), carried=[])
        return snap

    def _live_fork(self) -> Fork:
        ident = threading.get_ident()
        seed = self._ensure_seed()
        with self._lock:
            fork = self._live.get(ident)
            if fork is None or not fork.live:  # sealed: later writes go to a new fork
                if fork is not None:
                    self._carried.append(fork)
                fork = seed.new_fork()
                self._live[ident] = fork
        return fork

    def seal(self) -> Changes:
        """This thread is done writing through the snapshot: freeze its fork.

        Returns what the fork changed. The changes are computed once, here (in the worker),
        and travel with the snapshot, so the merge need not ask icechunk again.
        """
        return self._live_fork().seal()

    @property
    def store(self) -> IcechunkStore:
        """A writable zarr store: this thread's fork of the session."""
        return self._live_fork().store()

    @property
    def session(self) -> ForkSession:
        """This thread's icechunk ``ForkSession`` (writes through it are carried home too)."""
        return self._live_fork().session()

    @property
    def branch(self) -> str | None:
        """The branch of the session this snapshot was made from."""
        return self.lineage.branch

    @property
    def base_snapshot_id(self) -> str:
        """The snapshot id the base session was at when this snapshot was made."""
        return self.lineage.base_snapshot_id

    def _all_forks(self) -> list[Fork]:
        with self._lock:
            return [*self._carried, *self._live.values()]

    @property
    def has_uncommitted_changes(self) -> bool:
        """Whether any fork of this snapshot has written something not merged yet."""
        return any(f.has_changes() for f in self._all_forks())

    def n_chunks_written(self) -> int:
        """How many chunks this snapshot's forks wrote (each chunk counted once per fork)."""
        return sum(f.changes().n_chunks() for f in self._all_forks() if f.has_changes())

    def __reduce__(self) -> tuple[Any, ...]:
        if self._coordinator is not None:
            self._coordinator.check_window(self._seed.lineage if self._seed else None)
        seed = self._ensure_seed()
        forks = [f.export() for f in self._all_forks() if f.has_changes()]
        state = {"lineage": seed.lineage, "seed": seed.blob(), "forks": forks}
        return (_rebuild_snapshot, (state,))

    def __repr__(self) -> str:
        where = "coordinator" if self._coordinator is not None else "shipped"
        lineage = self._seed.lineage.describe() if self._seed else "not yet forked"
        n = len(self._carried) + len(self._live)
        return f"<SessionSnapshot ({where}) of {lineage}, {n} fork(s)>"


@contextlib.contextmanager
def pickling_window(coord: Coordinator) -> Iterator[SessionSnapshot]:
    """Open an ``allow_pickling()`` block on a session's coordinator; yield its snapshot."""
    base = coord.base()
    if base.read_only:
        raise SessionStateError(
            "allow_pickling() needs a writable session; this one is read-only (committed?)"
        )
    claim_process()
    snap = SessionSnapshot._new(coord)
    previous = coord.current, coord.current_reset
    coord.current, coord.current_reset = snap, snap._forget_seed
    coord.window_open = True
    try:
        yield snap
    except BaseException:
        # The caller is unwinding: nothing queued after this point should ship.
        coord.window_open = False
        coord.current, coord.current_reset = previous
        raise


def snapshot_target(snapshot: SessionSnapshot) -> Target:
    """A snapshot as the base of a merge (on a worker: a tree reduction)."""
    fork = snapshot._live_fork()
    lineage = snapshot.lineage
    with snapshot._lock:
        if snapshot._ledger is None:
            snapshot._ledger = Ledger()
        ledger = snapshot._ledger
    if ledger.version < lineage.version:  # forks of this block were made at it
        ledger.version = lineage.version
    return Target(fork.session(), lineage, ledger, "the snapshot")


def snapshot_items(snapshot: SessionSnapshot, name: str) -> list[Item]:
    """A snapshot's forks, each with the snapshot's lineage (if known), to merge."""
    lineage = snapshot._seed.lineage if snapshot._seed is not None else None
    return [(f, lineage, name) for f in snapshot._all_forks()]


def combine_snapshots(snapshots: list[SessionSnapshot]) -> SessionSnapshot | None:
    """The writes of several tasks' snapshots as one snapshot with one fork, or None.

    Run where the tasks ran (one engine call of several tasks): the coordinator then merges
    one fork per call instead of one per task. Only snapshots that can be combined without
    changing what the merge would decide are: each holds one sealed fork, all made from the
    same seed, writing chunks only, no chunk twice (their overlaps are the coordinator's to
    judge). None otherwise; the snapshots are then returned as they are.
    """
    if len(snapshots) < 2:
        return None
    forks: list[Fork] = []
    lineage = snapshots[0]._seed.lineage if snapshots[0]._seed is not None else None
    for snap in snapshots:
        mine = snap._all_forks()
        if snap._seed is None or snap._seed.lineage != lineage or len(mine) != 1:
            return None
        fork = mine[0]
        if fork.live or fork.seen is None or fork.changes().nodes:
            return None
        forks.append(fork)
    chunks: dict[str, list[tuple[int, ...]]] = {}
    for fork in forks:
        for path, coords in fork.changes().chunks.items():
            chunks.setdefault(path, []).extend(coords)
    if any(len(set(coords)) < len(coords) for coords in chunks.values()):
        return None
    session = forks[0].session()
    session.merge(*(f.session() for f in forks[1:]))
    combined = Fork(
        uid=uuid.uuid4().hex,
        seen=forks[0].seen,
        session=session,
        changes=Changes(chunks=chunks, nodes=frozenset(), new_nodes=frozenset()),
    )
    out = SessionSnapshot.__new__(SessionSnapshot)
    out._init(coordinator=None, seed=snapshots[0]._seed, carried=[combined])
    return out
