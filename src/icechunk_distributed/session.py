"""The core: picklable session snapshots and a merge that refuses unsafe input.

Icechunk's own protocol is: fork the writable session, ship the fork to every task, merge the
forks that come back, commit once. This module wraps that protocol so it is hard to misuse:

* :func:`allow_pickling` yields a :class:`SessionSnapshot`, a picklable handle whose ``store``
  is a writable fork. One icechunk fork is made per ``allow_pickling`` block, lazily, when the
  snapshot is first shipped; each task then works on its own copy of that fork.
* :func:`merge_sessions` merges snapshots (and plain icechunk ``ForkSession`` objects) back,
  all or nothing, after checking what icechunk does not: that each fork descends from the
  session it is merged into, and that no two forks wrote different bytes to one chunk.
* :class:`DistributedSession` (from :func:`writable_session`) is a drop-in wrapper of a
  writable icechunk ``Session`` that knows its own snapshots, pickles as one inside
  ``allow_pickling()`` and gives every non-owner thread its own fork, so the documented
  "share one session between threads" recipe cannot deadlock.

When pickling is allowed
------------------------
Pickling is allowed from the moment an ``allow_pickling()`` block is entered until the session
commits, discards its changes, or moves to another base snapshot (a rebase). Leaving the block
does not close it: executors such as ``ProcessPoolExecutor`` pickle queued work lazily, in a
background thread, long after ``submit`` returned. Snapshots that arrive in workers can always
be pickled again (that is how results travel home).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import icechunk
from icechunk import ForkSession, Session

from icechunk_distributed.errors import (
    CommitConflictError,
    ForeignSessionError,
    ForkStartMethodError,
    NotASnapshotError,
    OverlappingWritesError,
    PicklingNotAllowedError,
    SessionStateError,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator

    from icechunk import IcechunkStore, Repository
    from icechunk.conflicts import ConflictSolver
    from icechunk.snapshots import Diff

__all__ = [
    "DistributedSession",
    "SessionSnapshot",
    "allow_pickling",
    "merge_sessions",
    "writable_session",
]

ChunkCoords = tuple[int, ...]

_PICKLING_FIX = (
    "Ship it inside an allow_pickling() block and merge what the tasks return:\n\n"
    "    with session.allow_pickling():\n"
    "        futures = [executor.submit(task, session=session) for ...]\n"
    "    session = merge_sessions(session, *[f.result() for f in futures])\n"
    "    session.commit(...)\n"
)

# ---------------------------------------------------------------------------------------------
# The `fork` start method: icechunk's runtime does not survive it.

_USED_IN_PID: int | None = None


def _claim_process() -> None:
    """Record that this process uses icechunk; fail fast in a child forked after such use.

    Module state is inherited by a ``fork`` child and fresh in a ``spawn``/``forkserver`` one,
    so a recorded pid that is not ours means we were forked from a process that had already
    started icechunk's runtime: any icechunk call here would hang.
    """
    global _USED_IN_PID
    pid = os.getpid()
    if _USED_IN_PID is None:
        _USED_IN_PID = pid
    elif pid != _USED_IN_PID:
        raise ForkStartMethodError(
            f"This process (pid {pid}) was started with the 'fork' method from a process "
            f"(pid {_USED_IN_PID}) that had already used icechunk; icechunk would hang here. "
            "Start workers with 'spawn' or 'forkserver' instead, for example "
            "ProcessPoolExecutor(mp_context=multiprocessing.get_context('forkserver')) "
            "(or get_context('spawn')); with joblib use the default 'loky' backend."
        )


# ---------------------------------------------------------------------------------------------
# What a fork changed, in a form that is cheap to ship and to compare.


@dataclass(frozen=True, slots=True)
class _Changes:
    """The chunks and node metadata a fork changed (paths are absolute, like ``/temp``)."""

    chunks: dict[str, list[ChunkCoords]]
    nodes: frozenset[str]
    new_nodes: frozenset[str]

    @staticmethod
    def of(session: Session) -> _Changes:
        diff = session.status()
        new = diff.new_arrays | diff.new_groups
        nodes = new | diff.updated_arrays | diff.updated_groups
        nodes |= diff.deleted_arrays | diff.deleted_groups
        chunks = {path: [tuple(c) for c in coords] for path, coords in diff.updated_chunks.items()}
        return _Changes(chunks=chunks, nodes=frozenset(nodes), new_nodes=frozenset(new))

    def is_empty(self) -> bool:
        return not self.chunks and not self.nodes

    def n_chunks(self) -> int:
        return sum(len(c) for c in self.chunks.values())


class _Fork:
    """One icechunk fork, alive in this process or still as bytes from a pickle.

    A *live* fork is one this process writes through (a thread's fork): it may still change,
    so its changes are recomputed at every merge and merging it again merges its new writes
    (icechunk re-merges a fork idempotently). A fork that arrived by pickle is frozen: its
    ``uid`` survives pickling, so the same result reaching the coordinator twice is merged
    once, and its ``changes``, computed in the worker, travel with the bytes (recomputing them
    here would load the snapshot once per fork).
    """

    __slots__ = ("_blob", "_changes", "_session", "live", "uid")

    def __init__(
        self,
        *,
        uid: str,
        session: ForkSession | None = None,
        blob: bytes | None = None,
        changes: _Changes | None = None,
        live: bool = False,
    ) -> None:
        self.uid = uid
        self._session = session
        self._blob = blob
        self._changes = changes
        self.live = live

    def session(self) -> ForkSession:
        if self._session is None:
            assert self._blob is not None
            _claim_process()
            self._session = pickle.loads(self._blob)
            self._blob = None
        return self._session

    def store(self) -> IcechunkStore:
        return self.session().store

    def changes(self) -> _Changes:
        if self._changes is None or self.live:
            self._changes = _Changes.of(self.session())
        return self._changes

    def has_changes(self) -> bool:
        if self._changes is not None and not self.live:
            return not self._changes.is_empty()
        return self.session().has_uncommitted_changes

    def export(self) -> tuple[str, bytes, _Changes]:
        session = self.session()
        return (self.uid, pickle.dumps(session), self.changes())


# ---------------------------------------------------------------------------------------------
# Lineage: where a snapshot comes from.


@dataclass(frozen=True, slots=True)
class _Lineage:
    """Identifies the base session a snapshot was made from, and that base's state then."""

    token: str
    generation: int
    branch: str | None
    base_snapshot_id: str

    def describe(self) -> str:
        return f"branch {self.branch!r} at snapshot {self.base_snapshot_id}"

    def same_base(self, other: _Lineage, checkpoints: Collection[str] = ()) -> bool:
        """Same base session, with no commit, discard or rebase in between.

        ``checkpoints``: the base's earlier snapshot ids that it left by a checkpoint (see
        :meth:`DistributedSession._checkpoint`), which keeps forks made before it valid. Any
        other change of snapshot id (a rebase of a plain session, say) makes them stale.
        """
        return (
            self.token == other.token
            and self.generation == other.generation
            and (
                self.base_snapshot_id == other.base_snapshot_id
                or self.base_snapshot_id in checkpoints
            )
        )


class _Ledger:
    """What has been merged into one target: for overlap checks across merge calls."""

    __slots__ = ("chunks", "merged", "nodes")

    def __init__(self) -> None:
        # path -> chunk -> uid of the fork that wrote it (a live fork may rewrite its own)
        self.chunks: dict[str, dict[ChunkCoords, str]] = {}
        self.nodes: dict[str, str] = {}
        self.merged: set[str] = set()


class _Coordinator:
    """Book-keeping for one writable base session (ours or a plain icechunk one)."""

    def __init__(self, session: Session) -> None:
        self.token = uuid.uuid4().hex
        self.generation = 0
        self._session_ref = weakref.ref(session)
        self._lock = threading.RLock()
        self._seed: tuple[_Lineage, bytes] | None = None
        self.window_open = False
        self.current: SessionSnapshot | None = None
        self.ledger = _Ledger()
        self.thread_forks: dict[int, _Fork] = {}
        self.tracks_lifecycle = False  # True when a DistributedSession sees every commit
        self.checkpoints: set[str] = set()  # snapshot ids left by checkpoints, this generation

    def base(self) -> Session:
        session = self._session_ref()
        if session is None:  # pragma: no cover - the snapshot keeps its base alive
            raise SessionStateError("the session this snapshot was made from no longer exists")
        return session

    def lineage(self) -> _Lineage:
        base = self.base()
        return _Lineage(self.token, self.generation, base.branch, base.snapshot_id)

    def seed(self) -> tuple[_Lineage, bytes]:
        """The clean fork every task starts from; made once until the base changes."""
        with self._lock:
            base = self.base()
            lineage = self.lineage()
            if self._seed is None or self._seed[0] != lineage:
                if base.read_only:
                    raise SessionStateError(
                        "the session is read-only (was it committed?); open a new writable "
                        "session with writable_session(repo, branch) to write more"
                    )
                _claim_process()
                # Forking a dirty session writes an anonymous snapshot: do it once, not per task.
                self._seed = (lineage, pickle.dumps(base.fork()))
            return self._seed

    def invalidate_seed(self) -> None:
        with self._lock:
            self._seed = None

    def check_window(self, lineage: _Lineage | None) -> None:
        base = self.base()
        if not self.window_open:
            raise PicklingNotAllowedError(
                "Refusing to pickle a writable icechunk session: it never entered "
                "allow_pickling(), or the session was committed or discarded its changes "
                "since. " + _PICKLING_FIX
            )
        if base.read_only or (
            lineage is not None and not lineage.same_base(self.lineage(), self.checkpoints)
        ):
            self.window_open = False
            raise PicklingNotAllowedError(
                "Refusing to pickle a snapshot of a session that has committed, discarded its "
                "changes or been rebased since the snapshot was made: its tasks would write "
                "against an outdated base. Open a new allow_pickling() block. " + _PICKLING_FIX
            )

    def rebind(self, session: Session, left: str) -> None:
        """A checkpoint committed the base (at ``left``); ``session`` continues it."""
        with self._lock:
            self.checkpoints.add(left)
            self._session_ref = weakref.ref(session)
            self._seed = None
            self.thread_forks = {}
            if self.current is not None:  # tasks built from now on fork the new base
                self.current._seed = self.current._lineage = None

    def next_generation(self) -> None:
        """The base committed or discarded: every earlier snapshot is now stale."""
        with self._lock:
            self.generation += 1
            self._seed = None
            self.window_open = False
            self.current = None
            self.ledger = _Ledger()
            self.thread_forks = {}
            self.checkpoints = set()

    def thread_fork(self) -> _Fork:
        ident = threading.get_ident()
        with self._lock:
            fork = self.thread_forks.get(ident)
            if fork is None:
                _, blob = self.seed()
                fork = _Fork(uid=uuid.uuid4().hex, blob=blob, live=True)
                self.thread_forks[ident] = fork
            return fork

    def live_thread_forks(self) -> list[_Fork]:
        with self._lock:
            return list(self.thread_forks.values())


_PLAIN: dict[int, _Coordinator] = {}
_PLAIN_LOCK = threading.Lock()


def _coordinator_for(session: Session) -> _Coordinator:
    """The coordinator of a plain icechunk session, kept only as long as the session lives."""
    key = id(session)
    with _PLAIN_LOCK:
        coord = _PLAIN.get(key)
        if coord is None or coord._session_ref() is not session:
            coord = _Coordinator(session)
            _PLAIN[key] = coord
            weakref.finalize(session, _PLAIN.pop, key, None)
        return coord


# ---------------------------------------------------------------------------------------------
# SessionSnapshot


def _rebuild_snapshot(state: dict[str, Any]) -> SessionSnapshot:
    snap = SessionSnapshot.__new__(SessionSnapshot)
    snap._init(
        coordinator=None,
        lineage=state["lineage"],
        seed=state["seed"],
        carried=[_Fork(uid=u, blob=b, changes=c) for u, b, c in state["forks"]],
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

    _coordinator: _Coordinator | None
    _lineage: _Lineage | None
    _seed: bytes | None
    _live: dict[int, _Fork]
    _carried: list[_Fork]
    _ledger: _Ledger
    _lock: threading.Lock

    def __init__(self) -> None:
        raise TypeError("use allow_pickling(session) to make a SessionSnapshot")

    def _init(
        self,
        *,
        coordinator: _Coordinator | None,
        lineage: _Lineage | None,
        seed: bytes | None,
        carried: list[_Fork],
    ) -> None:
        self._coordinator = coordinator
        self._lineage = lineage
        self._seed = seed
        self._live = {}
        self._carried = carried
        self._ledger = _Ledger()
        self._lock = threading.Lock()

    @classmethod
    def _new(cls, coordinator: _Coordinator) -> SessionSnapshot:
        snap = cls.__new__(cls)
        snap._init(coordinator=coordinator, lineage=None, seed=None, carried=[])
        return snap

    # -- the seed is made lazily, the first time the snapshot is shipped or written through
    def _ensure_seed(self) -> tuple[_Lineage, bytes]:
        if self._seed is None or self._lineage is None:
            assert self._coordinator is not None
            self._lineage, self._seed = self._coordinator.seed()
        return self._lineage, self._seed

    def _fresh(self) -> SessionSnapshot:
        """A copy as a worker would receive it: same lineage and seed, no forks yet."""
        lineage, seed = self._ensure_seed()
        return _rebuild_snapshot({"lineage": lineage, "seed": seed, "forks": []})

    def _live_fork(self) -> _Fork:
        ident = threading.get_ident()
        with self._lock:
            fork = self._live.get(ident)
            if fork is None:
                _, seed = self._ensure_seed()
                fork = _Fork(uid=uuid.uuid4().hex, blob=seed, live=True)
                self._live[ident] = fork
        return fork

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
        return self._ensure_seed()[0].branch

    @property
    def base_snapshot_id(self) -> str:
        """The snapshot id the base session was at when this snapshot was made."""
        return self._ensure_seed()[0].base_snapshot_id

    def _all_forks(self) -> list[_Fork]:
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
            self._coordinator.check_window(self._lineage)
        lineage, seed = self._ensure_seed()
        forks = [f.export() for f in self._all_forks() if f.has_changes()]
        return (_rebuild_snapshot, ({"lineage": lineage, "seed": seed, "forks": forks},))

    def __repr__(self) -> str:
        where = "coordinator" if self._coordinator is not None else "shipped"
        lineage = self._lineage.describe() if self._lineage else "not yet forked"
        n = len(self._carried) + len(self._live)
        return f"<SessionSnapshot ({where}) of {lineage}, {n} fork(s)>"


# ---------------------------------------------------------------------------------------------
# DistributedSession


class DistributedSession:
    """A writable icechunk session that can be shipped to workers safely.

    It behaves like the ``icechunk.Session`` it wraps (``store``, ``commit``, ``status``,
    ``snapshot_id``, ``has_uncommitted_changes``, ``merge``, ...; anything else is forwarded)
    and adds :meth:`allow_pickling`. Make one with :func:`writable_session`.

    Parameters
    ----------
    session : icechunk.Session
        A writable session. It should not be used directly any more.
    repository : icechunk.Repository, optional
        The repository the session belongs to, kept for convenience.

    Notes
    -----
    Threads: the thread that made this object writes straight into the session; any other
    thread that takes :attr:`store` gets its own fork, merged back (with the overlap checks of
    :func:`merge_sessions`) by :meth:`commit`, :meth:`status`, :meth:`merge` and
    :attr:`has_uncommitted_changes`. Sharing one icechunk session between threads deadlocks
    zarr's I/O loop; one fork per thread does not. Thread writes must have finished when the
    owner thread commits.
    """

    def __init__(
        self, session: Session | DistributedSession, *, repository: Repository | None = None
    ) -> None:
        if isinstance(session, DistributedSession):
            session = session.session
        if not isinstance(session, Session) or isinstance(session, ForkSession):
            raise TypeError(
                f"DistributedSession wraps a writable icechunk Session, not {type(session)!r}"
            )
        if session.read_only:
            raise SessionStateError(
                "DistributedSession needs a writable session: use repo.writable_session(branch)"
            )
        _claim_process()
        self._session = session
        self._repository = repository
        self._owner = threading.get_ident()
        self._coordinator = _Coordinator(session)
        self._coordinator.tracks_lifecycle = True

    # -- icechunk Session surface
    @property
    def session(self) -> Session:
        """The wrapped icechunk ``Session``."""
        return self._session

    @property
    def repository(self) -> Repository | None:
        """The repository given to :func:`writable_session`, if any."""
        return self._repository

    @property
    def store(self) -> IcechunkStore:
        """The zarr store: the session's own on the owner thread, a per-thread fork elsewhere."""
        if threading.get_ident() == self._owner:
            # The owner may write through it: forks made from now on must see those writes.
            self._coordinator.invalidate_seed()
            return self._session.store
        return self._coordinator.thread_fork().store()

    @property
    def snapshot_id(self) -> str:
        """The snapshot the session is based on (the new one after a commit)."""
        return self._session.snapshot_id

    @property
    def branch(self) -> str | None:
        """The branch the session writes to."""
        return self._session.branch

    @property
    def read_only(self) -> bool:
        """Whether the session is read-only (it is, once committed)."""
        return self._session.read_only

    @property
    def has_uncommitted_changes(self) -> bool:
        """Whether there is anything to commit (thread forks are merged first)."""
        self._absorb_threads()
        return self._session.has_uncommitted_changes

    def status(self) -> Diff:
        """The changes not yet committed (thread forks are merged first)."""
        self._absorb_threads()
        return self._session.status()

    def merge(self, *others: SessionSnapshot | ForkSession) -> None:
        """Merge snapshots or forks into this session; see :func:`merge_sessions`."""
        merge_sessions(self, *others)

    def fork(self) -> ForkSession:
        """A raw icechunk fork (prefer :meth:`allow_pickling`)."""
        self._absorb_threads()
        return self._session.fork()

    def commit(
        self,
        message: str,
        metadata: dict[str, Any] | None = None,
        *,
        rebase_with: ConflictSolver | None = None,
        rebase_tries: int = 1_000,
        allow_empty: bool = False,
    ) -> str:
        """Merge thread forks, then commit; see ``icechunk.Session.commit``.

        After the commit every earlier snapshot is stale: pickling or merging one raises.
        """
        self._absorb_threads()
        try:
            return self._session.commit(
                message,
                metadata,
                rebase_with=rebase_with,
                rebase_tries=rebase_tries,
                allow_empty=allow_empty,
            )
        finally:
            if self._session.read_only:
                self._coordinator.next_generation()

    def _checkpoint(self, message: str, metadata: dict[str, Any]) -> str:
        """Commit what is merged so far and go on writing in a new session on the branch.

        Unlike :meth:`commit`, snapshots shipped before stay valid: their forks merge into the
        new session (icechunk merges forks of an older snapshot of the branch, and the overlap
        ledger still knows every chunk merged before). Only for a private branch nobody else
        commits to: a concurrent commit there raises ``icechunk.ConflictError``.
        """
        if self._repository is None:
            raise SessionStateError("checkpoints need the session's repository")
        self._absorb_threads()
        branch = self._session.branch
        assert branch is not None
        left = self._session.snapshot_id
        snapshot_id = self._session.commit(message, metadata, allow_empty=True)
        # The commit is made: from here on this object must end up writable again, or say
        # clearly that it cannot (a read-only session would refuse every later merge).
        for attempt in range(3):
            try:
                session = self._repository.writable_session(branch)
                break
            except icechunk.IcechunkError as exc:
                if attempt == 2:
                    raise SessionStateError(
                        f"checkpoint {snapshot_id} was committed to {branch!r}, but no new "
                        f"session could be opened on it ({exc}); the progress is kept there"
                    ) from exc
                time.sleep(0.5 * (attempt + 1))
        if session.snapshot_id != snapshot_id:
            raise CommitConflictError(
                f"branch {branch!r} moved past the checkpoint just committed: another process "
                "commits to it (a second coordinator with the same run_id?)"
            )
        self._session = session
        self._coordinator.rebind(session, left)
        return snapshot_id

    def discard_changes(self) -> None:
        """Drop every uncommitted change, including unmerged thread forks."""
        self._session.discard_changes()
        self._coordinator.next_generation()

    def rebase(self, solver: ConflictSolver) -> None:
        """Rebase onto the branch tip; snapshots made before are stale afterwards."""
        self._absorb_threads()
        self._session.rebase(solver)
        self._coordinator.next_generation()

    def __getattr__(self, name: str) -> Any:
        # Everything else (config, move, chunk_type, ...) is the wrapped session's.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._session, name)

    # -- distribution
    def allow_pickling(self) -> contextlib.AbstractContextManager[SessionSnapshot]:
        """Allow shipping this session to workers; yields the snapshot they receive.

        Inside the block, pickling this object (or the yielded snapshot) produces a
        :class:`SessionSnapshot`. See the module notes for when pickling stops being allowed.

        Returns
        -------
        contextlib.AbstractContextManager[SessionSnapshot]
            A context manager yielding the snapshot.
        """
        return _pickling_window(self._coordinator)

    def __reduce__(self) -> tuple[Any, ...]:
        coord = self._coordinator
        if self._session.read_only:
            raise PicklingNotAllowedError(
                "This DistributedSession was committed and is read-only. To read in workers, "
                "ship repo.readonly_session(...) instead; to write more, open a new one with "
                "writable_session(repo, branch)."
            )
        if coord.current is None or not coord.window_open:
            raise PicklingNotAllowedError(
                "Refusing to pickle a writable DistributedSession outside allow_pickling(). "
                + _PICKLING_FIX
            )
        return coord.current.__reduce__()

    def _absorb_threads(self) -> None:
        # Thread forks stay attached until the next commit: a thread may still write to one.
        forks = [f for f in self._coordinator.live_thread_forks() if f.has_changes()]
        if forks:
            _merge_forks(_target_of(self), [(f, None, "a thread's fork") for f in forks])

    def __repr__(self) -> str:
        state = "read-only" if self._session.read_only else "writable"
        return (
            f"<DistributedSession {state} branch={self._session.branch!r} "
            f"snapshot={self._session.snapshot_id}>"
        )


def writable_session(repo: Repository, branch: str = "main") -> DistributedSession:
    """Open a writable session on ``branch`` that can be shipped to workers.

    Parameters
    ----------
    repo : icechunk.Repository
        The repository to write to.
    branch : str, default "main"
        The branch to commit to.

    Returns
    -------
    DistributedSession
        A wrapper of ``repo.writable_session(branch)``.
    """
    return DistributedSession(repo.writable_session(branch), repository=repo)


@contextlib.contextmanager
def _pickling_window(coord: _Coordinator) -> Iterator[SessionSnapshot]:
    base = coord.base()
    if base.read_only:
        raise SessionStateError(
            "allow_pickling() needs a writable session; this one is read-only (committed?)"
        )
    _claim_process()
    snap = SessionSnapshot._new(coord)
    previous = coord.current
    coord.current = snap
    coord.window_open = True
    try:
        yield snap
    except BaseException:
        # The caller is unwinding: nothing queued after this point should ship.
        coord.window_open = False
        coord.current = previous
        raise


def allow_pickling(
    session: DistributedSession | Session,
) -> contextlib.AbstractContextManager[SessionSnapshot]:
    """Make a writable session shippable to workers; yields the snapshot to ship.

    Parameters
    ----------
    session : DistributedSession or icechunk.Session
        A writable session.

    Returns
    -------
    contextlib.AbstractContextManager[SessionSnapshot]
        Yields a picklable :class:`SessionSnapshot`. In a worker, its ``store`` is writable;
        return it from the task and pass it to :func:`merge_sessions`.

    Examples
    --------
    >>> with allow_pickling(session) as shareable:  # doctest: +SKIP
    ...     results = [f.result() for f in [ex.submit(task, i, shareable) for i in range(n)]]
    >>> merge_sessions(session, *results).commit("done")  # doctest: +SKIP
    """
    if isinstance(session, DistributedSession):
        return session.allow_pickling()
    if isinstance(session, ForkSession) or not isinstance(session, Session):
        raise TypeError(
            "allow_pickling() takes a writable icechunk Session or a DistributedSession, "
            f"not {type(session).__name__}; a ForkSession is already picklable"
        )
    return _pickling_window(_coordinator_for(session))


# ---------------------------------------------------------------------------------------------
# merge_sessions


@dataclass
class _Target:
    """Where merged forks go, and what may be merged into it."""

    session: Session
    lineage: _Lineage | None  # what snapshots must descend from; None: check node ids only
    ledger: _Ledger
    describe: str
    checkpoints: frozenset[str] = frozenset()


def _target_of(base: object) -> _Target:
    if isinstance(base, DistributedSession):
        return _session_target(base._session, base._coordinator)
    if isinstance(base, SessionSnapshot):
        fork = base._live_fork()
        lineage = base._ensure_seed()[0]
        return _Target(fork.session(), lineage, base._ledger, "the snapshot")
    if isinstance(base, ForkSession):
        return _Target(base, None, _Ledger(), "the fork")
    if isinstance(base, Session):
        if base.read_only:
            raise SessionStateError(
                "merge_sessions() needs a writable base session; this one is read-only"
            )
        return _session_target(base, _coordinator_for(base))
    raise TypeError(
        "merge_sessions() merges into a DistributedSession, a writable icechunk Session, a "
        f"SessionSnapshot or a ForkSession, not {type(base).__name__}"
    )


def _session_target(session: Session, coord: _Coordinator) -> _Target:
    checkpoints = frozenset(coord.checkpoints)
    return _Target(session, coord.lineage(), coord.ledger, "the session", checkpoints)


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, list | tuple):
            yield from _flatten(item)
        else:
            yield item


_Item = tuple[_Fork, _Lineage | None, str]


def _collect(base: object, sessions: Iterable[Any]) -> list[_Item]:
    """Turn merge_sessions' arguments into forks, each with its lineage (if known)."""
    out: list[_Item] = []
    seen_objects: set[int] = set()
    for n, obj in enumerate(_flatten(sessions)):
        if id(obj) in seen_objects or obj is base:
            continue  # the same object returned by many tasks; the base itself
        seen_objects.add(id(obj))
        if isinstance(obj, SessionSnapshot):
            lineage = obj._lineage
            out.extend((f, lineage, f"snapshot #{n}") for f in obj._all_forks())
        elif isinstance(obj, ForkSession):
            out.append((_Fork(uid=f"raw-{id(obj)}", session=obj), None, f"fork #{n}"))
        elif isinstance(obj, DistributedSession | Session):
            raise NotASnapshotError(
                f"item #{n} is a writable {type(obj).__name__}, not a snapshot or fork. "
                "Tasks must write to (and return) the snapshot they received: ship the session "
                "inside allow_pickling() and return it from the task; with plain icechunk use "
                "session.fork(). A writable session cannot be merged into another one."
            )
        else:
            raise NotASnapshotError(
                f"item #{n} is a {type(obj).__name__}; merge_sessions() takes SessionSnapshots "
                "(what tasks return after allow_pickling), icechunk ForkSessions, and "
                "(nested) lists of them"
            )
    return out


def _read_key(session: Session, key: str) -> bytes | None:
    """Read one key of a session's store without zarr's I/O loop.

    A blocking icechunk call made on zarr's single I/O thread deadlocks when another thread's
    write to the same session is suspended on that loop (the root of the shared-session hang),
    so reads made while tasks may still write use a private event loop instead.
    """

    async def get() -> bytes | None:
        try:
            return bytes(await session.store._store.get(key))
        except KeyError:
            return None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(get())
    # Called from inside a running loop (a notebook cell): use a thread with its own loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, get()).result()


def _chunk_key(metadata: dict[str, Any], coords: ChunkCoords) -> str:
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    name = encoding.get("name", "default")
    separator = encoding.get("configuration", {}).get("separator")
    if name == "v2":
        separator = separator or "."
        return separator.join(map(str, coords)) if coords else "0"
    separator = separator or "/"
    return separator.join(["c", *map(str, coords)])


def _chunk_bytes(session: Session, path: str, coords: ChunkCoords) -> bytes | None:
    prefix = path.strip("/")
    raw = _read_key(session, f"{prefix}/zarr.json")
    if raw is None:
        return None
    return _read_key(session, f"{prefix}/{_chunk_key(json.loads(raw), coords)}")


def _node_bytes(session: Session, path: str) -> bytes | None:
    return _read_key(session, f"{path.strip('/')}/zarr.json".lstrip("/"))


def _check_lineage(
    target: _Target, fork: _Fork, lineage: _Lineage | None, name: str, changes: _Changes
) -> None:
    if lineage is not None and target.lineage is not None:
        if lineage.token != target.lineage.token:
            raise ForeignSessionError(
                f"{name} was made from another session ({lineage.describe()}), not from "
                f"{target.describe} it is merged into ({target.lineage.describe()}). Icechunk "
                "would merge it silently and its data could be lost: merge each snapshot into "
                "the session whose allow_pickling() block produced it."
            )
        if not lineage.same_base(target.lineage, target.checkpoints):
            raise ForeignSessionError(
                f"{name} was made before {target.describe} committed, discarded its changes "
                f"or was rebased (then {lineage.describe()}, now "
                f"{target.lineage.describe()}); its writes are against an outdated base. Redo "
                "that work from a new allow_pickling() block."
            )
        return
    # No lineage to compare: check that every node the fork touched is the same node in the
    # target. A fork of another repository has other node ids, and icechunk drops its chunks.
    session = fork.session()
    for path in sorted(set(changes.chunks) | (changes.nodes - changes.new_nodes)):
        try:
            theirs = session.get_node_id(path)
        except icechunk.IcechunkError:
            continue  # deleted in the fork; nothing to attach to
        try:
            ours = target.session.get_node_id(path)
        except icechunk.IcechunkError:
            ours = None
        if ours != theirs:
            raise ForeignSessionError(
                f"{name} wrote to {path!r}, which is "
                + ("missing from" if ours is None else "a different array in")
                + f" {target.describe} it is merged into: the fork comes from another "
                "repository, branch or history. Icechunk would merge it silently and lose "
                "its data. Merge forks only into the session they were forked from."
            )


def _merge_forks(target: _Target, items: list[_Item]) -> None:
    """Validate every fork, then merge them all, or raise having merged nothing."""
    ledger = target.ledger
    todo: list[_Item] = []
    uids: set[str] = set()
    for item in items:
        fork = item[0]
        if fork.uid in uids or (not fork.live and fork.uid in ledger.merged):
            continue
        if not fork.has_changes():
            continue
        uids.add(fork.uid)
        todo.append(item)
    if not todo:
        return
    # A live fork may change under us: take its changes once, for checking and book-keeping.
    changes_of = {fork.uid: fork.changes() for fork, _, _ in todo}
    for fork, lineage, name in todo:
        _check_lineage(target, fork, lineage, name, changes_of[fork.uid])

    # Overlaps: with chunks merged by earlier calls (compare with the target's bytes) and
    # within this call (compare with the first writer's bytes). Identical bytes are fine.
    first: dict[tuple[str, ChunkCoords], _Item] = {}
    first_node: dict[str, _Item] = {}
    conflicts: list[tuple[str, ChunkCoords]] = []
    described: list[str] = []
    empty: dict[ChunkCoords, str] = {}
    for item in todo:
        fork, _, name = item
        changes = changes_of[fork.uid]
        for path, coords in changes.chunks.items():
            merged = ledger.chunks.get(path, empty)
            for c in coords:
                key = (path, c)
                if merged.get(c, fork.uid) != fork.uid:
                    other, other_name = target.session, f"an earlier merge into {target.describe}"
                elif key in first:
                    other, other_name = first[key][0].session(), first[key][2]
                else:
                    first[key] = item
                    continue
                if _chunk_bytes(fork.session(), path, c) != _chunk_bytes(other, path, c):
                    conflicts.append(key)
                    if len(described) < 10:
                        described.append(f"  {path} chunk {list(c)}: {name} and {other_name}")
        for path in changes.nodes:
            if ledger.nodes.get(path, fork.uid) != fork.uid:
                other, other_name = target.session, f"an earlier merge into {target.describe}"
            elif path in first_node:
                other, other_name = first_node[path][0].session(), first_node[path][2]
            else:
                first_node[path] = item
                continue
            if _node_bytes(fork.session(), path) != _node_bytes(other, path):
                conflicts.append((path, ()))
                if len(described) < 10:
                    described.append(f"  {path} metadata: {name} and {other_name}")
    if conflicts:
        more = f"\n  ... and {len(conflicts) - len(described)} more" if len(conflicts) > 10 else ""
        raise OverlappingWritesError(
            f"{len(conflicts)} chunk(s) were written with different bytes by two sessions; "
            "icechunk would silently keep whichever is merged last. Nothing was merged.\n"
            + "\n".join(described)
            + more
            + "\nMake each task write whole chunks of its own region only (regions aligned to "
            "the chunk grid, no two tasks writing the same chunk).",
            conflicts,
        )

    target.session.merge(*(fork.session() for fork, _, _ in todo))
    for fork, _, _ in todo:
        changes = changes_of[fork.uid]
        for path, coords in changes.chunks.items():
            owners = ledger.chunks.setdefault(path, {})
            for c in coords:
                owners[c] = fork.uid
        for path in changes.nodes:
            ledger.nodes[path] = fork.uid
        ledger.merged.add(fork.uid)


def merge_sessions[B: (DistributedSession, Session, SessionSnapshot)](base: B, *sessions: Any) -> B:
    """Merge what tasks returned into ``base``, all or nothing; return ``base``.

    Parameters
    ----------
    base : DistributedSession, icechunk.Session, SessionSnapshot or icechunk.ForkSession
        Where the writes go. A snapshot or fork as base merges on a worker (tree reduction);
        merge the result into the session afterwards.
    *sessions : SessionSnapshot, icechunk.ForkSession, or (nested) lists of them
        What the tasks returned. The same object given many times is merged once, and
        forks that wrote nothing are skipped.

    Returns
    -------
    DistributedSession, icechunk.Session, SessionSnapshot or icechunk.ForkSession
        ``base``, with the writes merged in.

    Raises
    ------
    ForeignSessionError
        A snapshot comes from another session, repository or branch, or from before the base
        committed or discarded; or a raw fork writes to arrays the base does not have.
    OverlappingWritesError
        Two sessions wrote different bytes to the same chunk (identical bytes are accepted).
    NotASnapshotError
        An item is a writable session or something else that is not a snapshot or fork.

    Notes
    -----
    Nothing is merged unless every item passes. Overlaps are checked against everything merged
    into the same base by earlier calls too, so merging results one by one as they arrive is
    as safe as merging them at once. The cost is linear in the chunks written; bytes are only
    read for chunks written twice.
    """
    if isinstance(base, DistributedSession):
        base._absorb_threads()
    target = _target_of(base)
    items = _collect(base, sessions)
    _merge_forks(target, items)
    return base
