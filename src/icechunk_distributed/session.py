"""The core: picklable session snapshots and a merge that refuses unsafe input.

Icechunk's own protocol is: fork the writable session, ship the fork to every task, merge the
forks that come back, commit once. This module wraps that protocol so it is hard to misuse:

* :func:`allow_pickling` yields a :class:`SessionSnapshot`, a picklable handle whose ``store``
  is a writable fork. One icechunk fork (the *seed*) is made per ``allow_pickling`` block,
  lazily, when the snapshot is first shipped, so it sees everything merged before; each task
  then works on its own fork of the seed.
* :func:`merge_sessions` merges snapshots (and plain icechunk ``ForkSession`` objects) back,
  all or nothing, after checking what icechunk does not: that each fork descends from the
  session (and repository) it is merged into, and that no two writers that could not see
  each other wrote different bytes to one chunk (the rule and the checks are in ``merge``).
* :class:`DistributedSession` (from :func:`writable_session`) is a drop-in wrapper of a
  writable icechunk ``Session`` that knows its own snapshots, pickles as one inside
  ``allow_pickling()`` and gives every non-owner thread its own fork, so the documented
  "share one session between threads" recipe cannot deadlock; every thread's store still
  sees what the others wrote.

When pickling is allowed
------------------------
Pickling is allowed from the moment an ``allow_pickling()`` block is entered until the session
commits, discards its changes, or moves to another base snapshot (a rebase). Leaving the block
does not close it: executors such as ``ProcessPoolExecutor`` pickle queued work lazily, in a
background thread, long after ``submit`` returned. Snapshots that arrive in workers can always
be pickled again (that is how results travel home).
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import icechunk
from icechunk import ForkSession, Session

from icechunk_distributed.errors import (
    CommitConflictError,
    NotASnapshotError,
    PicklingNotAllowedError,
    SessionStateError,
    UnshareableStorageError,
)
from icechunk_distributed.forks import Changes, Fork, claim_process, read_key
from icechunk_distributed.merge import Item, Ledger, Lineage, Target, merge_forks

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

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

_PICKLING_FIX = (
    "Ship it inside an allow_pickling() block and merge what the tasks return:\n\n"
    "    with session.allow_pickling():\n"
    "        futures = [executor.submit(task, session=session) for ...]\n"
    "    session = merge_sessions(session, *[f.result() for f in futures])\n"
    "    session.commit(...)\n"
)

# ---------------------------------------------------------------------------------------------
# The seed: the fork every task of one block starts from.


class _Seed:
    """A fork of the base, made once per block, from which every task's fork is made.

    A task's fork is a fork of it (no pickle round trip per task). In the process that made
    it, the seed is the fork itself, so in-memory storage keeps working; elsewhere it arrives
    as bytes and is unpickled once per process.
    """

    __slots__ = ("_blob", "_session", "lineage")

    def __init__(
        self, lineage: Lineage, *, session: ForkSession | None = None, blob: bytes | None = None
    ) -> None:
        self.lineage = lineage
        self._session = session
        self._blob = blob

    def session(self) -> ForkSession:
        if self._session is None:
            claim_process()
            self._session = pickle.loads(self.blob())
        return self._session

    def blob(self) -> bytes:
        if self._blob is None:
            assert self._session is not None
            self._blob = pickle.dumps(self._session)
        return self._blob

    def new_fork(self) -> Fork:
        """A new live fork of the base as it was when the seed was made."""
        session = self.session().fork()  # a fork of a clean fork writes nothing
        return Fork(uid=uuid.uuid4().hex, seen=self.lineage.version, session=session, live=True)


@dataclass(slots=True)
class _ThreadFork:
    fork: Fork
    lineage: Lineage
    thread: threading.Thread


class _Coordinator:
    """Book-keeping for one writable base session (ours or a plain icechunk one)."""

    def __init__(self, session: Session) -> None:
        self.token = uuid.uuid4().hex
        self.generation = 0
        self._session_ref = weakref.ref(session)
        self.lock = threading.RLock()
        self._seed: _Seed | None = None
        self._shareable: bool | None = None
        self.window_open = False
        self.current: SessionSnapshot | None = None
        self.ledger = Ledger()
        self.checkpoints: set[str] = set()  # snapshot ids left by checkpoints, this generation
        # DistributedSession's per-thread forks, the retired ones (for the commit-time check
        # that nothing was written through them since) and the forks merged while an older
        # thread fork is live (merged again after it, so that later writes stay last).
        self.thread_forks: dict[int, _ThreadFork] = {}
        self.retired: list[tuple[Fork, tuple[int, int]]] = []
        self.history: list[Fork] = []
        self.storage: str | None = None  # the repository's storage, when known

    def base(self) -> Session:
        session = self._session_ref()
        if session is None:  # pragma: no cover - the snapshot keeps its base alive
            raise SessionStateError("the session this snapshot was made from no longer exists")
        return session

    def lineage(self) -> Lineage:
        base = self.base()
        return Lineage(
            self.token, self.generation, base.branch, base.snapshot_id, self.ledger.version
        )

    def seed(self) -> _Seed:
        """A fork of the base as it is now; made again only after the base changed."""
        with self.lock:
            self.absorb_threads()  # the new seed must see what threads wrote
            base = self.base()
            lineage = self.lineage()
            if self._seed is None or self._seed.lineage != lineage:
                if base.read_only:
                    raise SessionStateError(
                        "the session is read-only (was it committed?); open a new writable "
                        "session with writable_session(repo, branch) to write more"
                    )
                claim_process()
                # Forking a dirty session writes an anonymous snapshot: once per state.
                self._seed = _Seed(lineage, session=base.fork())
            return self._seed

    def touched(self) -> None:
        """The base may be written through directly: forks made from now on must see it."""
        with self.lock:
            self.ledger.version += 1

    def check_shareable(self) -> None:
        """Refuse storage that a pickled copy cannot reach (in-memory storage), once."""
        with self.lock:
            if self._shareable is None and self.storage is not None:
                self._shareable = "in-memory" not in self.storage
            if self._shareable is None:
                # Without the repository: a copy that cannot read what the base reads.
                seed = self.seed()
                copy: ForkSession = pickle.loads(seed.blob())
                try:
                    read_key(copy, "zarr.json")
                    self._shareable = True
                except icechunk.IcechunkError:
                    read_key(seed.session(), "zarr.json")  # a real storage error raises here
                    self._shareable = False
            if not self._shareable:
                raise UnshareableStorageError(
                    "This session's repository is in memory (icechunk.in_memory_storage()): "
                    "a copy shipped to another process opens a new, empty store, so the "
                    "tasks there could not read it and their writes would be lost. Use it "
                    "with executor='serial' or 'threads' (or a ThreadPoolExecutor), or put "
                    "the repository on storage every worker can reach: "
                    "icechunk.local_filesystem_storage(path) on one machine, object storage "
                    "(s3_storage, gcs_storage, ...) for a cluster."
                )

    def check_window(self, lineage: Lineage | None) -> None:
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
        self.check_shareable()

    def rebind(self, session: Session, left: str) -> None:
        """A checkpoint committed the base (at ``left``); ``session`` continues it."""
        with self.lock:
            self.checkpoints.add(left)
            self._session_ref = weakref.ref(session)
            self._seed = None
            for ident in list(self.thread_forks):  # merged by the checkpoint; watched after
                self.retire(ident)
            self.history = []
            if self.current is not None:  # tasks built from now on fork the new base
                self.current._seed = None

    def next_generation(self) -> None:
        """The base committed or discarded: every earlier snapshot is now stale."""
        with self.lock:
            self.generation += 1
            self._seed = None
            self.window_open = False
            self.current = None
            self.ledger = Ledger(version=self.ledger.version + 1)
            self.thread_forks = {}
            self.retired = []
            self.history = []
            self.checkpoints = set()

    # -- merges into the base
    def target(self) -> Target:
        checkpoints = frozenset(self.checkpoints)
        return Target(
            self.base(), self.lineage(), self.ledger, "the session", checkpoints, self.storage
        )

    def merge(self, items: list[Item]) -> list[Fork]:
        """Merge into the base; forks merged while an older thread fork lives are kept."""
        with self.lock:
            merged = merge_forks(self.target(), items, replay=self.history)
            oldest = min((t.fork.seen or 0 for t in self.thread_forks.values()), default=None)
            if oldest is None:
                self.history = []
            else:
                seen = self.ledger.seen_of
                ours = {t.fork.uid for t in self.thread_forks.values()}
                kept = [f for f in self.history if seen(f) > oldest]
                kept += [f for f in merged if f.uid not in ours and seen(f) > oldest]
                self.history = kept
            return merged

    def absorb_threads(self) -> None:
        """Merge what every thread fork wrote (they stay live: a thread may write on)."""
        with self.lock:
            items: list[Item] = [
                (t.fork, t.lineage, "a thread's fork") for t in self.thread_forks.values()
            ]
            if items:
                self.merge(items)
            for ident, record in list(self.thread_forks.items()):
                if not record.thread.is_alive():  # it will not write again
                    self.retire(ident)

    def retire(self, ident: int) -> None:
        """This thread's fork is done (the thread is back for a new store, or has ended)."""
        record = self.thread_forks.pop(ident)
        self.ledger.own.pop(record.fork.uid, None)  # never merged again, never re-checked
        # Even a fork that wrote nothing is watched: a store kept from it may still write.
        changes = record.fork.seal()
        self.retired.append((record.fork, changes.size()))
        if not changes.is_empty():
            self.history.append(record.fork)

    def thread_store(self) -> IcechunkStore:
        """This thread's store: a fork that sees every write merged so far."""
        ident = threading.get_ident()
        me = threading.current_thread()
        with self.lock:
            # Everything written by any thread so far is merged, so this thread's new fork
            # sees it. The caller's own earlier writes are finished (it is here), as are
            # those of ended threads: their forks retire. (A new thread may reuse the ident
            # of an ended one, hence the comparison of thread objects.)
            self.absorb_threads()
            for i, other in list(self.thread_forks.items()):
                done = (
                    other.fork.has_changes() if other.thread is me else not other.thread.is_alive()
                )
                if done:
                    self.retire(i)
            mine = self.thread_forks.get(ident)
            if mine is not None and (mine.fork.seen or 0) < self.ledger.version:
                self.retire(ident)  # it wrote nothing, but others did since it was made
                mine = None
            if mine is None:
                seed = self.seed()
                mine = _ThreadFork(seed.new_fork(), seed.lineage, me)
                self.thread_forks[ident] = mine
            return mine.fork.store()

    def check_retired(self) -> None:
        """Refuse to commit if a thread wrote through a store its fork no longer backs."""
        with self.lock:
            retired = list(self.retired)
        for fork, size in retired:
            now = Changes.of(fork.session()).size()
            if now != size:
                raise SessionStateError(
                    "A thread wrote through a DistributedSession store it had taken before "
                    f"it took session.store again ({now[0] - size[0]} more chunk(s), "
                    f"{now[1] - size[1]} more array(s) or group(s)); those writes would be "
                    "lost. Take session.store inside each task, once per task, and do not "
                    "keep a store from one task to the next."
                )


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
    lineage: Lineage = state["lineage"]
    snap._init(
        coordinator=None,
        seed=_Seed(lineage, blob=state["seed"]),
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

    _coordinator: _Coordinator | None
    _seed: _Seed | None
    _live: dict[int, Fork]
    _carried: list[Fork]
    _ledger: Ledger
    _lock: threading.Lock

    def __init__(self) -> None:
        raise TypeError("use allow_pickling(session) to make a SessionSnapshot")

    def _init(
        self, *, coordinator: _Coordinator | None, seed: _Seed | None, carried: list[Fork]
    ) -> None:
        self._coordinator = coordinator
        self._seed = seed
        self._live = {}
        self._carried = carried
        self._ledger = Ledger()
        self._lock = threading.Lock()

    @classmethod
    def _new(cls, coordinator: _Coordinator) -> SessionSnapshot:
        snap = cls.__new__(cls)
        snap._init(coordinator=coordinator, seed=None, carried=[])
        return snap

    # -- the seed is made lazily, the first time the snapshot is shipped or written through:
    # every task of the block then starts from the session as it was at that moment.
    def _ensure_seed(self) -> _Seed:
        with self._lock:
            if self._seed is None:
                assert self._coordinator is not None
                self._seed = self._coordinator.seed()
            return self._seed

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
    thread that takes :attr:`store` gets its own fork. Thread forks are merged back (with the
    overlap checks of :func:`merge_sessions`) whenever any thread takes :attr:`store`, and by
    :meth:`commit`, :meth:`status`, :meth:`merge`, :meth:`fork`,
    :attr:`has_uncommitted_changes` and every forwarded attribute, so every thread's store
    sees what the others wrote so far. A thread that takes :attr:`store` again gets a new fork:
    take it once per task. Sharing one icechunk session between threads deadlocks zarr's I/O
    loop; one fork per thread does not. Thread writes must have finished when the owner thread
    commits.
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
        claim_process()
        self._session = session
        self._repository = repository
        self._owner = threading.get_ident()
        self._coordinator = _Coordinator(session)
        if repository is not None:
            # icechunk names a storage in its repr ("type: local filesystem", "path: ...").
            self._coordinator.storage = ", ".join(repr(repository.storage).splitlines()[1:])

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
        """The zarr store: the session's own on the owner thread, a per-thread fork elsewhere.

        Either way it sees every write made through this session on any thread so far.
        """
        if threading.get_ident() == self._owner:
            return self.direct_store()
        return self._coordinator.thread_store()

    def direct_store(self) -> IcechunkStore:
        """The wrapped session's own store, from any thread.

        Thread forks are merged first, and forks made afterwards see what is written through
        it. Do not write through it while other threads write through this session.
        """
        self._absorb_threads()
        # The caller may write through it: forks made from now on must see those writes.
        self._coordinator.touched()
        return self._session.store

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
        """A raw icechunk fork (prefer :meth:`allow_pickling`).

        Its writes merge back with :func:`merge_sessions` as those of a snapshot of the
        session as it is now would.
        """
        coord = self._coordinator
        with coord.lock:
            self._absorb_threads()
            fork = self._session.fork()
            coord.ledger.raw_seen.setdefault(fork.snapshot_id, coord.ledger.version)
            return fork

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
        self._coordinator.check_retired()
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
        # Everything else (config, move, chunk_coordinates, ...) is the wrapped session's;
        # it must see what threads wrote, as the session's own reads would.
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._session.read_only:
            self._absorb_threads()
        return getattr(self._session, name)

    def check_shareable(self) -> None:
        """Raise :class:`UnshareableStorageError` if tasks in other processes cannot use it.

        In-memory storage cannot cross processes: a pickled copy opens a new, empty store.
        """
        self._coordinator.check_shareable()

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
        # A thread fork stays live until its thread takes store again: it may still write.
        self._coordinator.absorb_threads()

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
    claim_process()
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


def _target_of(base: object) -> Target | _Coordinator:
    """Where merge_sessions merges: a session's coordinator, or a snapshot or fork as is."""
    if isinstance(base, DistributedSession):
        return base._coordinator
    if isinstance(base, SessionSnapshot):
        fork = base._live_fork()
        lineage = base.lineage
        if base._ledger.version < lineage.version:  # forks of this block were made at it
            base._ledger.version = lineage.version
        return Target(fork.session(), lineage, base._ledger, "the snapshot")
    if isinstance(base, ForkSession):
        return Target(base, None, Ledger(), "the fork")
    if isinstance(base, Session):
        if base.read_only:
            raise SessionStateError(
                "merge_sessions() needs a writable base session; this one is read-only"
            )
        return _coordinator_for(base)
    raise TypeError(
        "merge_sessions() merges into a DistributedSession, a writable icechunk Session, a "
        f"SessionSnapshot or a ForkSession, not {type(base).__name__}"
    )


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, list | tuple):
            yield from _flatten(item)
        else:
            yield item


def _collect(base: object, sessions: Iterable[Any]) -> list[Item]:
    """Turn merge_sessions' arguments into forks, each with its lineage (if known)."""
    out: list[Item] = []
    seen_objects: set[int] = set()
    for n, obj in enumerate(_flatten(sessions)):
        if id(obj) in seen_objects or obj is base:
            continue  # the same object returned by many tasks; the base itself
        seen_objects.add(id(obj))
        if isinstance(obj, SessionSnapshot):
            lineage = obj._seed.lineage if obj._seed is not None else None
            out.extend((f, lineage, f"snapshot #{n}") for f in obj._all_forks())
        elif isinstance(obj, ForkSession):
            fork = Fork(uid=f"raw-{uuid.uuid4().hex}", seen=None, session=obj)
            out.append((fork, None, f"fork #{n}"))
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
        committed or discarded; or a raw fork writes to arrays the base does not have, or
        wrote chunks that are not objects of the base's repository (a copy of it).
    OverlappingWritesError
        Two writers that could not see each other's writes (tasks of one block, or a fork and
        an earlier merge made after it) wrote different bytes to the same chunk. Identical
        bytes are accepted; a fork made after an earlier merge overwrites it deliberately.
    NotASnapshotError
        An item is a writable session or something else that is not a snapshot or fork.

    Notes
    -----
    Nothing is merged unless every item passes. Overlaps are checked against earlier merges
    into the same base too (the rule is in ``docs/core.md``), so merging results one by one as
    they arrive is as safe as merging them at once. The cost is linear in the chunks written;
    bytes are only read for chunks written twice, and one chunk per raw icechunk fork.
    """
    if isinstance(base, DistributedSession):
        base._absorb_threads()
    target = _target_of(base)
    items = _collect(base, sessions)
    if isinstance(target, _Coordinator):
        target.merge(items)
    else:
        merge_forks(target, items)
    return base
