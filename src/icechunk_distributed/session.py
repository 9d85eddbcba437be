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
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import icechunk
from icechunk import ForkSession, Session

from icechunk_distributed.coordinator import PICKLING_FIX, Coordinator, coordinator_of
from icechunk_distributed.errors import (
    CommitConflictError,
    NotASnapshotError,
    PicklingNotAllowedError,
    SessionStateError,
)
from icechunk_distributed.forks import Fork, claim_process
from icechunk_distributed.merge import Item, Ledger, Target, merge_forks
from icechunk_distributed.snapshot import (
    SessionSnapshot,
    pickling_window,
    snapshot_items,
    snapshot_target,
)

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
    "open_session",
    "writable_session",
]

# ---------------------------------------------------------------------------------------------
# DistributedSession


# After a checkpoint commit, opening the next session on the branch is retried this often,
# waiting BACKOFF, 2 x BACKOFF, ... seconds: a store that throttles for a moment must not
# turn a committed checkpoint into a failed run.
_REOPEN_TRIES = 3
_REOPEN_BACKOFF = 0.5


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
        if repository is not None:
            # icechunk names a storage in its repr ("type: local filesystem", "path: ...").
            self._coord().storage = ", ".join(repr(repository.storage).splitlines()[1:])

    def _coord(self) -> Coordinator:
        # The registry is the one place a session's book-keeping lives: this wrapper, other
        # wrappers and merges into the plain session all find the same coordinator.
        return coordinator_of(self._session)

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
        return self._coord().thread_store()

    def direct_store(self) -> IcechunkStore:
        """The wrapped session's own store, from any thread.

        Thread forks are merged first, and forks made afterwards see what is written through
        it. Do not write through it while other threads write through this session.
        """
        self._absorb_threads()
        # The caller may write through it: forks made from now on must see those writes.
        self._coord().touched()
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
        coord = self._coord()
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
        self._coord().check_retired()
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
                self._coord().next_generation()

    def checkpoint(self, message: str, metadata: dict[str, Any]) -> str:
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
        for attempt in range(_REOPEN_TRIES):
            try:
                session = self._repository.writable_session(branch)
                break
            except icechunk.IcechunkError as exc:
                if attempt == _REOPEN_TRIES - 1:
                    raise SessionStateError(
                        f"checkpoint {snapshot_id} was committed to {branch!r}, but no new "
                        f"session could be opened on it ({exc}); the progress is kept there"
                    ) from exc
                time.sleep(_REOPEN_BACKOFF * (attempt + 1))
        if session.snapshot_id != snapshot_id:
            raise CommitConflictError(
                f"branch {branch!r} moved past the checkpoint just committed: another process "
                "commits to it (a second coordinator with the same run_id?)"
            )
        # Re-file the coordinator under the new session before this wrapper switches to it:
        # the registry is keyed by session, and looking it up by the new one first would
        # start an empty coordinator (and refuse every fork of the open block).
        coord = self._coord()
        with coord.lock:
            coord.rebind(session, left)
            self._session = session
        coord.after_rebind()
        return snapshot_id

    def discard_changes(self) -> None:
        """Drop every uncommitted change, including unmerged thread forks."""
        self._session.discard_changes()
        self._coord().next_generation()

    def rebase(self, solver: ConflictSolver) -> None:
        """Rebase onto the branch tip; snapshots made before are stale afterwards."""
        self._absorb_threads()
        self._session.rebase(solver)
        self._coord().next_generation()

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
        self._coord().check_shareable()

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
        return pickling_window(self._coord())

    def __reduce__(self) -> tuple[Any, ...]:
        coord = self._coord()
        if self._session.read_only:
            raise PicklingNotAllowedError(
                "This DistributedSession was committed and is read-only. To read in workers, "
                "ship repo.readonly_session(...) instead; to write more, open a new one with "
                "writable_session(repo, branch)."
            )
        if coord.current is None or not coord.window_open:
            raise PicklingNotAllowedError(
                "Refusing to pickle a writable DistributedSession outside allow_pickling(). "
                + PICKLING_FIX
            )
        reduced: tuple[Any, ...] = coord.current.__reduce__()
        return reduced

    def _absorb_threads(self) -> None:
        # A thread fork stays live until its thread takes store again: it may still write.
        self._coord().absorb_threads()

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


def open_session(target: Any, branch: str) -> DistributedSession:
    """The writable session a write goes through.

    Parameters
    ----------
    target : icechunk.Repository, icechunk.Session or DistributedSession
        A repository (a new writable session on ``branch`` is opened) or a writable session.
    branch : str
        The branch, for a repository.

    Returns
    -------
    DistributedSession
        The session (the given one, wrapped if it is a plain icechunk session).
    """
    if isinstance(target, icechunk.Repository):
        return writable_session(target, branch)
    if isinstance(target, DistributedSession):
        session = target
    elif isinstance(target, icechunk.Session) and not isinstance(target, icechunk.ForkSession):
        session = DistributedSession(target)
    else:
        raise TypeError(
            "target must be an icechunk Repository or a writable Session/DistributedSession, "
            f"not {type(target).__name__}"
        )
    if session.read_only:
        raise SessionStateError(
            "the target session is read-only; pass the Repository, or repo.writable_session(branch)"
        )
    return session


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
    return pickling_window(coordinator_of(session))


# ---------------------------------------------------------------------------------------------
# merge_sessions


def _target_of(base: object) -> Target | Coordinator:
    """Where merge_sessions merges: a session's coordinator, or a snapshot or fork as is."""
    if isinstance(base, DistributedSession):
        return coordinator_of(base.session)
    if isinstance(base, SessionSnapshot):
        return snapshot_target(base)
    if isinstance(base, ForkSession):
        return Target(base, None, Ledger(), "the fork")
    if isinstance(base, Session):
        if base.read_only:
            raise SessionStateError(
                "merge_sessions() needs a writable base session; this one is read-only"
            )
        return coordinator_of(base)
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
            out.extend(snapshot_items(obj, f"snapshot #{n}"))
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
    if isinstance(target, Coordinator):
        target.merge(items)
    else:
        merge_forks(target, items)
    return base
